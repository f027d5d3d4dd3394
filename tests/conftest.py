"""Shared by every test folder. Kept free of torch: ``make test-edge-alone`` runs tests/edge in a
venv without it, and pytest loads this file there too.

Test helpers used by more than one folder (``tiny_runs``) live next to this file; pytest puts
this folder on ``sys.path`` when it loads it (the test folders are not packages).
"""
