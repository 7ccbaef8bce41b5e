"""Download stage throughput relative to bare img2dataset, same input, same loopback server, same run.

    python -m benchmarks.bench_download [--images 4000] [--repeats 3] [--work /tmp/curate-bench]

Both sides run as fresh processes with the same settings (2 processes x 32 threads, 256 px border
resize, jpg q95, sha256) against the same fault-free images; the order alternates between repeats and
the ratio of medians is reported. Our side runs with the guarded fetch on (address guard with the
loopback server allow-listed, robots.txt, deadline, byte cap, per-host cap at its default), so the
ratio is the price of crawling safely. Target: curate / img2dataset >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from examples.demo_world import DemoServer, encode_image, random_scene, render_scene

PROCESSES, THREADS, SHARD_SIZE, IMAGE_SIZE = 2, 32, 1000, 256
TARGET = 0.9


def make_clean_web(root: Path, images: int, seed: int = 0) -> Path:
    files = root / "files" / "img"
    if files.exists() and len(list(files.iterdir())) == images:
        return root
    shutil.rmtree(root, ignore_errors=True)
    files.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        (files / f"{i:06d}.jpg").write_bytes(encode_image(render_scene(rng, random_scene(rng)), "jpg"))
    return root


def write_table(root: Path, base_url: str, images: int) -> Path:
    table = pd.DataFrame(
        {
            "url": [f"{base_url}/img/{i:06d}.jpg" for i in range(images)],
            "caption": [f"image number {i}" for i in range(images)],
        }
    )
    path = root / "crawl.parquet"
    table.to_parquet(path, index=False)
    return path


BARE_SCRIPT = """
import sys
from img2dataset import download
if __name__ == "__main__":
    download(url_list=sys.argv[1], output_folder=sys.argv[2], input_format="parquet", url_col="url",
             caption_col="caption", output_format="webdataset", processes_count={p}, thread_count={t},
             number_sample_per_shard={s}, image_size={i}, resize_mode="border", encode_quality=95,
             timeout=10, retries=0, compute_hash="sha256", extract_exif=False, user_agent_token="curate")
"""


def time_bare(table: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    script = BARE_SCRIPT.format(p=PROCESSES, t=THREADS, s=SHARD_SIZE, i=IMAGE_SIZE)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", script, str(table), str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    return time.perf_counter() - started


def time_curate(table: Path, out: Path, work: Path, server_netloc: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    pipeline = work / "bench_download.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "output": str(out),
                "stages": ["input", "download"],
                "input": {"path": str(table), "shard_size": SHARD_SIZE},
                "download": {
                    "processes": PROCESSES,
                    "threads": THREADS,
                    "image_size": IMAGE_SIZE,
                    "resize_mode": "border",
                    "encode_quality": 95,
                    "timeout": 10,
                    "retries": 0,
                    "compute_hash": "sha256",
                    "guarded_fetch": True,
                    "allow_hosts": [server_netloc],
                },
            }
        )
    )
    command = [sys.executable, "-m", "curate"]
    subprocess.run([*command, "input", str(pipeline), "--no-progress"], check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run([*command, "download", str(pipeline), "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - started


def count_successes(out: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def run(images: int = 4000, repeats: int = 3, work: Path = Path("/tmp/curate-bench")) -> dict:
    root = make_clean_web(work / "clean-web", images)
    bare_times, curate_times = [], []
    with DemoServer(root) as server:
        table = write_table(root, server.base_url, images)
        for repeat in range(repeats):
            order = ["bare", "curate"] if repeat % 2 == 0 else ["curate", "bare"]
            for side in order:
                if side == "bare":
                    bare_times.append(time_bare(table, work / "bare-out"))
                    assert count_successes(work / "bare-out") == images
                else:
                    curate_times.append(
                        time_curate(table, work / "curate-out", work, server.base_url.removeprefix("http://"))
                    )
                    assert count_successes(work / "curate-out" / "download") == images
    bare, ours = statistics.median(bare_times), statistics.median(curate_times)
    ratio = bare / ours
    return {
        "name": "download_vs_img2dataset",
        "images": images,
        "bare_img2dataset_samples_per_s": round(images / bare, 1),
        "curate_samples_per_s": round(images / ours, 1),
        "ratio": round(ratio, 3),
        "target": f">= {TARGET}",
        "passed": ratio >= TARGET,
        "seconds": {"bare": [round(t, 2) for t in bare_times], "curate": [round(t, 2) for t in curate_times]},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    args = parser.parse_args()
    print(json.dumps(run(args.images, args.repeats, args.work), indent=2))
