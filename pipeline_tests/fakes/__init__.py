"""Hand-written fakes of external systems, speaking their real protocols on loopback."""
