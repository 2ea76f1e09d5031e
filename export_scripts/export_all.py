"""Export every built-in miner to ONNX, verify it and write a manifest.

Same as ``exportminers export``; see ``python export_scripts/export_all.py --help``.

Example:
    python export_scripts/export_all.py --out graphs --embedding-dim 128
"""
import sys

from exportminers.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
