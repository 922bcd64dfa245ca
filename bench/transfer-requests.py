"""The Ironic-agent-style peer of bench/transfer.ts: what ironic-python-agent's
image download does (requests, stream=True, iter_content of 1 MiB, hashlib
sha256, write, fsync at the end), against nginx over HTTPS.

    python3 bench/transfer-requests.py URL TARGET CA_FILE

Prints one JSON line: bytes, sha256, ms, cpuMs (this process, all threads),
startedAt and endedAt (epoch ms), timed from the request to the end of fsync.
"""
import hashlib
import json
import os
import resource
import sys
import time

import requests

CHUNK = 1024 * 1024


def main():
    url, target, ca = sys.argv[1:4]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    digest = hashlib.sha256()
    received = 0
    with requests.get(url, stream=True, verify=ca, timeout=60) as response:
        response.raise_for_status()
        with open(target, "r+b") as disk:
            for chunk in response.iter_content(chunk_size=CHUNK):
                digest.update(chunk)
                disk.write(chunk)
                received += len(chunk)
            disk.flush()
            os.fsync(disk.fileno())
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    print(json.dumps({
        "type": "result",
        "bytes": received,
        "sha256": digest.hexdigest(),
        "ms": (ended - started) * 1000,
        "cpuMs": cpu * 1000,
        "startedAt": started * 1000,
        "endedAt": ended * 1000,
    }), flush=True)


if __name__ == "__main__":
    main()
