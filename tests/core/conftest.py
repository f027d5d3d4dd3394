import os

# Test runs sharing two cores: OpenMP spin-waiting under oversubscription is ruinous.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
