"""The tests by subject, one file each; the method's own facts are in test_epsdpo.py at the top."""
