"""`python -m rtpllm.cli ...` (how `rtpllm up` starts its children)."""

import sys

from rtpllm.cli import main

sys.exit(main())
