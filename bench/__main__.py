"""Runs the benchmark modules in bench/ (all, or those named: `python -m bench local_build`), each `main()`
printing and recording its figures, then writes the table of the latest results (bench/_report.py)."""

import importlib
import pkgutil
import sys

import bench
from bench import _report

names = sys.argv[1:] or sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
for module in names:
    print(f"== bench.{module}", flush=True)
    importlib.import_module(f"bench.{module}").main()
_report.write_table()
