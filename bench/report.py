"""Turn a pytest-benchmark JSON into instances/s and speed-up ratios.

    python bench/report.py bench/results/posterior_cpu.json [--out bench/results/posterior_cpu.md]

Ratios compare implementations of the same group measured in the same run,
using each one's median time.
"""
import argparse
import json
import sys


def summarize(data):
    groups = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rate = info["instances"] / b["stats"]["median"]
        groups.setdefault(b["group"], []).append((info["impl"], rate, b["stats"]["median"], info))
    return groups


def markdown(data):
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; torch threads as recorded per row.",
        "",
    ]
    for group, rows in summarize(data).items():
        base = {impl: rate for impl, rate, _, _ in rows}
        lines += [f"### {group}", "", "| implementation | instances | median time (s) | instances/s | mlellp speed-up |",
                  "|---|---:|---:|---:|---:|"]
        for impl, rate, median, info in sorted(rows, key=lambda r: -r[1]):
            ours = base.get("mlellp")
            ratio = f"{ours / rate:.1f}x" if ours else "n/a"
            lines.append(f"| {impl} ({info['dtype']}, {info['threads']} threads) | {info['instances']:,} | "
                         f"{median:.4f} | {rate:,.0f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--out", help="write the Markdown table here too")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        text = markdown(json.load(f))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
