"""The data pipeline at the paper's scale, on a CPU (BENCHMARKS.md, "Data"): tokenising throughput, loader throughput
at 32K, one rank's resident memory against the corpus size, and the time to resume mid-epoch.

    python -m benchmarks.bench_data --sources data/corpus/books data/corpus/python-docs data/corpus/linux-docs \\
        --copies 1,9,89 --work /tmp/bench-data

The corpus is the given sources' .txt/.md files repeated: corpus n holds n copies of each source, and every copy of a
file starts with a line naming the copy, so no two files are equal and nothing comes from a cache (the built corpus,
11.3M tokens, makes 1.0B tokens in 89 copies). The smaller corpora are hard links to the first copies of the largest,
so they take no disk. Steps:
1. hash every file (the content keys; later starts find them in the digest memo), then tokenise the largest corpus
   (timed: the throughput) and then the others, with `load_documents` and one process per core;
2. per corpus, in a fresh process as a training rank would: open it, stream windows of 32K as configs/smollm2-32k.yaml
   does (upsampling 5 above 8K tokens, EOS after each document), sampling /proc/self/status; the windows/s of one
   process reading every window (the loader fed to 8 GPUs would need 8 x 80K x 10 = 6.4M tokens/s);
3. per corpus, another fresh process resumes at the middle of the first epoch: open, build the stream, load the state,
   read the first batch.
The work directory (corpus and token stores) is deleted at the end unless --keep is given.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from errors import write_atomic

SEQ_LEN = 32768
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenising workers): the machine may be shared."""
    return sum(t for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for t in (resource.getrusage(who).ru_utime, resource.getrusage(who).ru_stime))


def memory() -> dict[str, float]:
    """This process's resident memory in MiB, from /proc/self/status."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(status[k].split()[0]) / 1024 for k in STATUS_KEYS}


def make_corpora(sources: list[Path], copies: list[int], root: Path) -> dict[int, list[str]]:
    """copies -> the paths of that corpus's sources; the largest written, the others hard links into it."""
    most = max(copies)
    paths = {n: [str(root / f"x{n}" / f"{s.name}_x{n}") for s in sources] for n in copies}
    for source in sources:
        files = sorted(f for f in source.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        for k in range(most):
            for f in files:
                rel = Path(f"copy{k:03d}") / f.relative_to(source)
                for n in sorted(copies, reverse=True):  # the largest first: the others link to it
                    if k < n:
                        target = root / f"x{n}" / f"{source.name}_x{n}" / rel
                        target.parent.mkdir(parents=True, exist_ok=True)
                        first = root / f"x{most}" / f"{source.name}_x{most}" / rel
                        if n == most:
                            target.write_bytes(f"Copy {k} of {f.name}.\n".encode() + f.read_bytes())
                        else:
                            os.link(first, target)
    return paths


def stream(paths: list[str], cache_dir: str, windows: int, world_size: int) -> dict:
    """As one training rank (rank 0 of world_size): open the corpus, stream `windows` windows; memory and speed."""
    from loading import tokenizer
    from loading import weights
    from training.data import DataConfig, PackedStream, load_documents

    tok = tokenizer.load(weights.default_checkpoint())
    before = memory()
    t0 = time.perf_counter()
    docs = load_documents(DataConfig(paths=paths, cache_dir=cache_dir), tok)
    opened = time.perf_counter() - t0
    s = PackedStream(docs, SEQ_LEN, upsample_long=5.0, long_doc_tokens=8192, suffix=[tok.eos_id],
                     world_size=world_size)
    built = time.perf_counter() - t0 - opened
    after_open, peak = memory(), memory()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(windows):
        s.next_batch(1)
        if i % 100 == 0:
            peak = {k: max(v, memory()[k]) for k, v in peak.items()}
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    corpus = sum(int(d.lengths.sum()) for d in docs.values())
    return dict(corpus_tokens=corpus, documents=sum(len(d) for d in docs.values()), open_s=opened, stream_s=built,
                windows=windows, windows_per_s=windows / elapsed, tokens_per_s=windows * SEQ_LEN / elapsed,
                windows_per_cpu_s=windows / cpu,
                mem_before_open=before, mem_after_open=after_open, mem_streaming_peak=peak, mem_end=memory(),
                epochs=s.stats()["epoch"])


def resume(paths: list[str], cache_dir: str) -> dict:
    """A fresh rank resuming at the middle of epoch 0: open, build the stream, load the state, first batch."""
    from loading import tokenizer
    from loading import weights
    from training.data import DataConfig, PackedStream, load_documents

    tok = tokenizer.load(weights.default_checkpoint())
    t0 = time.perf_counter()
    docs = load_documents(DataConfig(paths=paths, cache_dir=cache_dir), tok)
    t1 = time.perf_counter()
    s = PackedStream(docs, SEQ_LEN, upsample_long=5.0, long_doc_tokens=8192, suffix=[tok.eos_id])
    t2 = time.perf_counter()
    state = dict(s.state_dict(), window=s.stats()["windows_in_epoch"] // 2)
    s.load_state_dict(state)
    s.next_batch(1)
    t3 = time.perf_counter()
    return dict(open_s=t1 - t0, stream_s=t2 - t1, seek_and_first_batch_s=t3 - t2, total_s=t3 - t0,
                window=state["window"])


def in_fresh_process(mode: str, **kwargs) -> dict:
    child = [sys.executable, "-m", "benchmarks.bench_data", "--child", json.dumps(dict(mode=mode, **kwargs))]
    done = subprocess.run(child, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # a measurement in a fresh process (in_fresh_process)
        job = json.loads(argv[1])
        mode = job.pop("mode")
        print(json.dumps(stream(**job) if mode == "stream" else resume(**job)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", type=Path, required=True, help="directories of .txt/.md documents")
    p.add_argument("--copies", default="1,9,89", help="corpora to make, in copies of the sources (default: 1,9,89)")
    p.add_argument("--work", type=Path, required=True, help="a scratch directory for the corpora and token stores")
    p.add_argument("--windows", type=int, default=4000, help="windows each rank streams (default: 4000)")
    p.add_argument("--world-size", type=int, default=8, help="ranks the memory run is one of (default: 8)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)

    from loading import tokenizer
    from loading import weights
    from training.data import DataConfig, load_documents
    from training.token_store import _content, _sources

    copies = sorted(int(c) for c in args.copies.split(","))
    cache_dir = str(args.work / "cache")
    results = dict(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), copies=copies, seq_len=SEQ_LEN)
    try:
        t0 = time.perf_counter()
        corpora = make_corpora(args.sources, copies, args.work / "corpus")
        results["write_corpus_s"] = time.perf_counter() - t0
        all_paths = [p for n in copies for p in corpora[n]]
        cfg = DataConfig(paths=all_paths, cache_dir=cache_dir)
        t0 = time.perf_counter()
        for source in _sources(all_paths):
            _content(source, cfg)  # sha256 of every file, remembered in the digest memo
        results["hash_s"] = time.perf_counter() - t0
        results["text_bytes"] = sum(f.stat().st_size for f in (args.work / "corpus" / f"x{copies[-1]}").rglob("*.*"))
        tok = tokenizer.load(weights.default_checkpoint())
        t0, c0, results["load_before"] = time.perf_counter(), cpu_seconds(), os.getloadavg()
        docs = load_documents(DataConfig(paths=corpora[copies[-1]], cache_dir=cache_dir), tok)
        results["tokenise_s"], results["tokenise_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
        results["load_after"] = os.getloadavg()
        results["tokens"] = sum(int(d.lengths.sum()) for d in docs.values())
        results["tokens_per_s"] = results["tokens"] / results["tokenise_s"]
        results["tokens_per_cpu_s"] = results["tokens"] / results["tokenise_cpu_s"]
        load_documents(cfg, tok)  # the smaller corpora
        print(f"tokenised {results['tokens']:,} tokens in {results['tokenise_s']:.0f} s", file=sys.stderr)
        results["stream"], results["resume"], results["loader"] = {}, {}, {}
        for n in copies:
            results["stream"][n] = in_fresh_process("stream", paths=corpora[n], cache_dir=cache_dir,
                                                    windows=args.windows, world_size=args.world_size)
            results["resume"][n] = in_fresh_process("resume", paths=corpora[n], cache_dir=cache_dir)
            print(f"x{n}: {json.dumps(results['stream'][n])}\n{json.dumps(results['resume'][n])}", file=sys.stderr)
        results["loader"] = in_fresh_process("stream", paths=corpora[copies[-1]], cache_dir=cache_dir,
                                             windows=args.windows, world_size=1)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=1))
    print(report(results))


def report(r: dict) -> str:
    lines = [f"Tokenising: {r['tokens']:,} tokens ({r['text_bytes'] / 1e9:.2f} GB of text) in {r['tokenise_s']:.0f} s "
             f"= {r['tokens_per_s']:,.0f} tokens/s on {r['cpus']} cores (hashing the files first: "
             f"{r['hash_s']:.0f} s); {r['tokens_per_cpu_s']:,.0f} tokens per CPU-second; load average "
             f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after",
             f"Loader, one process reading every window: {r['loader']['windows_per_s']:,.0f} windows/s of {SEQ_LEN} "
             f"= {r['loader']['tokens_per_s'] / 1e6:,.1f}M tokens/s",
             "", "| corpus | tokens | documents | RSS after open (MiB) | RSS streaming, peak | anon | file-backed | "
             "windows/s (rank 0 of 8) | resume: open + stream + seek (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, s in r["stream"].items():
        res = r["resume"][n]
        lines.append(f"| x{n} | {s['corpus_tokens']:,} | {s['documents']:,} | {s['mem_after_open']['VmRSS']:.0f} | "
                     f"{s['mem_streaming_peak']['VmRSS']:.0f} | {s['mem_streaming_peak']['RssAnon']:.0f} | "
                     f"{s['mem_streaming_peak']['RssFile']:.0f} | {s['windows_per_s']:,.0f} | "
                     f"{res['open_s']:.2f} + {res['stream_s']:.2f} + {res['seek_and_first_batch_s']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from errors import run_cli

    run_cli(main)
