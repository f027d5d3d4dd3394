import os

# Two engineers' test runs on two cores: OpenMP spin-waiting under oversubscription is ruinous.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
