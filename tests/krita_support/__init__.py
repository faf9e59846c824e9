"""Helpers for the Krita plug-in tests: a mock ``krita`` module, a cuttable TCP proxy,
an engine that records what it produced, and the real-Krita runner scripts."""
