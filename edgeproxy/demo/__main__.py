"""``python -m edgeproxy.demo``: the demo, with its options."""

from __future__ import annotations

import argparse
import sys

from . import __doc__ as demo_doc
from . import add_demo_arguments, main

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m edgeproxy.demo", description=demo_doc.splitlines()[0])
    add_demo_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
