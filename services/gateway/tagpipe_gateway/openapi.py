"""Write the app's OpenAPI document: `python -m tagpipe_gateway.openapi docs/openapi.json`.

The committed `docs/openapi.json` is checked against the live app by a unit
test, so the published contract cannot drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tagpipe_gateway.app import create_app
from tagpipe_gateway.settings import GatewaySettings


def spec() -> dict[str, Any]:
    # Settings do not shape the document; defaults keep it independent of the environment.
    app = create_app(GatewaySettings.model_construct())
    return app.openapi()


def render() -> str:
    return json.dumps(spec(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
