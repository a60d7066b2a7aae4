"""A source's AssetWatcher reaches Airflow whatever order it reads the DAGs in.

Airflow keeps one definition per asset, taken from whichever DAG of a file it reads last (the DAGs of a file
come as a set), so the producer's outlet must carry the watchers the consumer's schedule adds.
"""

from __future__ import annotations

import json
from pathlib import Path

from goldsmith import lineage
from goldsmith.dag_factory import build_dags

BASE = "/subscriptions/s/resourceGroups/golden/providers/Microsoft.Compute/galleries/g/images/base"


def write(folder: Path, name: str, source: dict, goldsmith: dict | None = None) -> None:
    body = {"location": "westeurope", "properties": {
        "source": source,
        "customize": [{"type": "Shell", "name": "noop", "inline": ["true"]}],
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": f"{BASE}-{name}"}],
    }, "goldsmith": goldsmith or {}}
    (folder / f"{name}.json").write_text(json.dumps(body))


def test_producer_outlet_and_consumer_schedule_are_one_asset_with_the_watcher(tmp_path: Path) -> None:
    write(tmp_path, "a", {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                          "version": "latest"})
    write(tmp_path, "b", {"type": "SharedImageVersion", "imageVersionId": f"{BASE}-a/versions/latest"},
          {"sourceTrigger": True})
    dags = build_dags(tmp_path)
    scheduled = dags["b"].timetable.asset_condition
    [produced] = dags["a"].task_dict["distribute.sig"].outlets
    assert produced.uri == scheduled.uri == lineage.image_uri(f"{BASE}-a")
    assert [w.name for w in produced.watchers] == [w.name for w in scheduled.watchers] == ["b-source"]
