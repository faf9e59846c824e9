"""Round-trip a 2048x2048 RGBA canvas through a running ControlCanvas server.

    controlcanvas serve --step-seconds 0.05 &       # fake engine, 50 ms per step
    python examples/roundtrip.py                    # token read from the token file
    python examples/roundtrip.py --url ws://gpu-box:7351 --token TOKEN   # another computer

Shows progress, cancels one job half-way, and checks that the returned layer has
exactly the canvas size.  Uses only the standard library and ``websockets``, like
the plug-ins.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.client import DEFAULT_URL, Client  # noqa: E402
from shared.errors import Cancelled, ControlCanvasError  # noqa: E402
from shared.loopback import choose_token  # noqa: E402
from shared.images import Image  # noqa: E402
from shared.messages import ControlUnit, GenerateRequest, Progress  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--token", help="default, for a server on this computer only: its "
                        "token file")
    parser.add_argument("--side", type=int, default=2048)
    args = parser.parse_args()
    side = args.side
    canvas = Image(side, side, bytes(range(256)) * (side * side * 4 // 256))
    request = GenerateRequest(width=side, height=side, prompt="round trip", seed=7, steps=10,
                              controls=(ControlUnit(condition="lineart", image=0),))
    try:
        token = choose_token(args.url, args.token or "", entered_source="--token",
                             enter_it="pass its token with --token").token_or_raise()
        client = Client.connect(args.url, token, client="roundtrip")
    except (ControlCanvasError, OSError) as err:
        print(f"roundtrip: {err}", file=sys.stderr)
        return 1
    with client:
        t0 = time.monotonic()
        job = client.submit(request, {0: canvas})

        def show(event):
            if isinstance(event, Progress) and event.total:
                print(f"  step {event.step}/{event.total}")

        result = client.wait(job, on_event=show)
        (meta, layer), = result.images
        assert layer.size == (side, side), layer.size
        print(f"result {layer.width}x{layer.height} seed {meta.seed} in "
              f"{time.monotonic() - t0:.2f} s")

        job = client.submit(request, {0: canvas})
        for event in client.events(timeout=30):
            if isinstance(event, Progress) and event.job_id == job and event.step >= 3:
                client.cancel(job)
                break
        try:
            client.wait(job)
            print("cancel arrived too late; the job finished")
        except Cancelled as err:
            print(f"cancelled: {err.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
