"""Weight-only PTQ of a real pretrained transformer: RTN, GPTQ, AWQ and Norm Tweaking on all-MiniLM-L6-v2.

Calibration: ``--samples`` segments of 128 tokens cut from docstrings of one set of standard-library
modules (which segments: chosen by the seed). Evaluation: up to 256 docstrings of a disjoint set of
modules, never used for calibration. For each method and seed, the quantized model's sentence embeddings
are compared with the float model's: mean cosine similarity, and the Spearman correlation between the
two models' pairwise-similarity matrices (what a retrieval or clustering user sees). Every method runs in
its own subprocess so that its wall time and peak resident memory are its own.

    python benchmarks/llm_quality.py [--seeds 0 1 2] [--configs w4g128 w3g128 w2g64 w8a8] [--methods RTN GPTQ AWQ]
        [--samples 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings

# method -> (recipe, extra overrides) per configuration
CONFIGS = {
    "w4g128": {
        "RTN": ("rtn_w4g128", []),
        "GPTQ": ("gptq_w4g128", []),
        "AWQ": ("awq_w4g128", []),
        "Norm Tweaking": ("normtweak_w4g128", []),
    },
    "w3g128": {
        "RTN": ("rtn_w4g128", ["weights.bits=3"]),
        "GPTQ": ("gptq_w3g128", []),
        "AWQ": ("awq_w4g128", ["weights.bits=3"]),
        "Norm Tweaking": ("normtweak_w3g128", []),
    },
    "w2g64": {
        "RTN": ("rtn_w4g128", ["weights.bits=2", "weights.group_size=64"]),
        "GPTQ": ("gptq_w2g64", []),
        "AWQ": ("awq_w4g128", ["weights.bits=2", "weights.group_size=64"]),
        "Norm Tweaking": ("normtweak_w4g128", ["weights.bits=2", "weights.group_size=64"]),
    },
    "w8a8": {
        "W8A8 dynamic": ("w8a8_dynamic", []),
        "W8A8 static": (  # SmoothQuant's grids without smoothing
            "smoothquant_w8a8",
            ["ptq.algorithm=none", "weights.method=observer", "activations.method=observer"],
        ),
        "SmoothQuant W8A8": ("smoothquant_w8a8", []),
    },
}


def worker(recipe: str, overrides: list[str], seed: int, samples: int, threads: int) -> dict:
    """Quantize MiniLM with one recipe and compare its embeddings with float; runs in a fresh process."""
    import torch
    from scipy.stats import spearmanr

    sys.path.insert(0, os.path.dirname(__file__))
    from common import quiet_trainer

    from lightning_quant import PostTrainingQuantization
    from lightning_quant.examples.text import (
        CALIBRATION_MODULES,
        EVALUATION_MODULES,
        SentenceEncoder,
        calibration_loader,
        stdlib_docstrings,
        text_loader,
    )

    torch.set_num_threads(threads)
    calib_text = stdlib_docstrings(CALIBRATION_MODULES)
    eval_text = [t for t in stdlib_docstrings(EVALUATION_MODULES) if t not in set(calib_text)][:256]
    random.Random(seed).shuffle(calib_text)  # the seed picks which calibration segments are used
    model = SentenceEncoder.from_minilm()
    evaluation = text_loader(model.tokenizer, eval_text, batch_size=32)
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in evaluation])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calib = calibration_loader(model.tokenizer, calib_text, num_samples=samples, seq_len=128, batch_size=1)
    cb = PostTrainingQuantization(recipe, overrides=overrides, calibration_dataloader=calib, compare_float=False)
    start = time.perf_counter()
    out = torch.cat(quiet_trainer([cb]).predict(model, evaluation))
    wall = time.perf_counter() - start
    iu = torch.triu_indices(len(eval_text), len(eval_text), 1)
    rho = spearmanr((out @ out.T)[iu[0], iu[1]].numpy(), (ref @ ref.T)[iu[0], iu[1]].numpy()).statistic
    return {
        "cosine": float((out * ref).sum(-1).mean()),
        "spearman": float(rho),
        "quantize_s": cb.timings["calibration_s"] + cb.timings["reconstruction_s"],
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "float_rss_mb": base_rss,
        "eval_texts": len(eval_text),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    methods = sorted({m for config in CONFIGS.values() for m in config})
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods, help="default: all")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("lightning_quant").setLevel(logging.ERROR)
        recipe, seed, overrides = args.worker[0], int(args.worker[1]), args.worker[2:]
        print("RESULT " + json.dumps(worker(recipe, overrides, seed, args.samples, args.threads)))
        return

    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    from common import header

    torch.set_num_threads(args.threads)
    print(header("python benchmarks/llm_quality.py " + " ".join(sys.argv[1:])))
    print(f"model: all-MiniLM-L6-v2 (real weights), calibration {args.samples} x 128 tokens, seeds {args.seeds}\n")
    rows = []
    for config in args.configs:
        for method, (recipe, overrides) in CONFIGS[config].items():
            if method not in args.methods:
                continue
            results = []
            for seed in args.seeds:
                cmd = [sys.executable, __file__, "--samples", str(args.samples), "--threads", str(args.threads)]
                cmd += ["--worker", recipe, str(seed), *overrides]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{method} {config} seed {seed} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[0][7:]))
                print(f"  {config} {method} seed {seed}: {results[-1]}", file=sys.stderr, flush=True)
            rows.append((config, method, results))

    if not rows:
        sys.exit(f"none of --methods {args.methods} is in --configs {args.configs}")

    def ms(key: str, res: list[dict], fmt: str) -> str:
        vals = [r[key] for r in res]
        spread = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        return f"{format(statistics.mean(vals), fmt)} ± {format(spread, fmt)}"

    print("| config | method | cosine to float | Spearman of similarities | quantize time (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for config, method, res in rows:
        rss = statistics.median(r["peak_rss_mb"] for r in res)
        print(
            f"| {config} | {method} | {ms('cosine', res, '.4f')} | {ms('spearman', res, '.4f')} "
            f"| {statistics.median(r['quantize_s'] for r in res):.1f} | {rss:.0f} |"
        )
    float_rss = statistics.median(r["float_rss_mb"] for _, _, res in rows for r in res)
    print(
        f"\nfloat model loaded + evaluated: peak RSS {float_rss:.0f} MB; {rows[0][2][0]['eval_texts']} evaluation "
        "docstrings; mean ± population std over seeds; times are medians"
    )


if __name__ == "__main__":
    main()
