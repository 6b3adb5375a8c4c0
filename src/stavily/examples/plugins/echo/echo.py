"""Echo: prints its input as one JSON object (the Stavily plugin convention)."""

import argparse
import json
import sys

parser = argparse.ArgumentParser()
# Agents pass `--input <file>` only when the step has input (its config).
parser.add_argument("--input")
args = parser.parse_args()
data = {}
if args.input:
    with open(args.input) as handle:
        data = json.load(handle)
context = data.get("context") or {}
print(f"echo: step {context.get('step')}", file=sys.stderr)
json.dump(
    {
        "echo": data.get("input_data") or {},
        "step": context.get("step"),
        "inputs": context.get("inputs") or {},
    },
    sys.stdout,
)
