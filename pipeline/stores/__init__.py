"""Readers and writers of what the assets store: one module per product area.

Assets, checks, guards and sensors read stored outputs through these functions, so
a check never imports an asset module and the two always read the same way.
"""
