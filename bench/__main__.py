"""Runs every benchmark module in bench/ in turn: each has a `main()` that prints and records its figures."""

import importlib
import pkgutil

import bench

for module in sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")):
    print(f"== bench.{module}")
    importlib.import_module(f"bench.{module}").main()
