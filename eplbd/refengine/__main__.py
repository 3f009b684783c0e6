"""``python -m eplbd.refengine``: one rank of the reference engine (see ``eplbd.refengine.rank``)."""

import sys

from eplbd.refengine.rank import main

sys.exit(main())
