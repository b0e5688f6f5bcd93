"""Offline testbed: procedurally generated QA data (``mmtok.testbed.data``) and the small models trained on it.

Importing this package is cheap: it imports none of its subpackages.
"""
