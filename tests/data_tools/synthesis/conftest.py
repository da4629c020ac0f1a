import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # for `import synth_helpers` in the tests
