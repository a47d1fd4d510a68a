import sys
from pathlib import Path

# Tests import their helpers (reference, emulated_device, cuda_emulation) by plain name.
sys.path.insert(0, str(Path(__file__).parent))
