"""Paths of the committed fixtures (a uniquely named module, so tests can import it by name)."""
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
COND = FIXTURES / "tiny_cond"  # c = 0.2 of T = 100 (20 client levels), 10 classes, 1×8×8
LOCAL = FIXTURES / "tiny_local"  # c = 1 of T = 50, unconditional, 3×8×8
