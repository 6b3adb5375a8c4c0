"""System information: facts about the machine the agent runs on, as one JSON object."""

import argparse
import json
import os
import platform
import socket
import sys

parser = argparse.ArgumentParser()
# Agents pass `--input <file>` only when the step has input; this plugin reads none.
parser.add_argument("--input")
parser.parse_args()
facts = {
    "hostname": socket.gethostname(),
    "platform": platform.platform(),
    "python": sys.version.split()[0],
    "cpu_count": os.cpu_count(),
}
if hasattr(os, "getloadavg"):
    facts["load_average"] = list(os.getloadavg())
json.dump(facts, sys.stdout)
