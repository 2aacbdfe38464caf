"""Benchmark attackers and utility measures (DESIGN.md §6).

``attack_face`` is attacker A1: face detection and dlib face recognition on surface renders. Its
packages are optional (the ``attack`` group of pyproject.toml), so nothing here is imported eagerly.
"""
