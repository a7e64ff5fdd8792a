from __future__ import annotations

import sys

from trainwire.cli import main

sys.exit(main())
