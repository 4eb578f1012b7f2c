"""``python -m tfx_xmatch.serving --model_name=NAME --model_base_path=PATH ...``: the model server."""

import sys

from tfx_xmatch.serving.server import main

sys.exit(main())
