"""Every chart value is documented (`## @param`), validated by the schema and listed in the README.

`python tests/unit/test_chart_docs.py` prints the README's parameter table from values.yaml,
so the table is regenerated, never hand-edited.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tagpipe"
PARAM = re.compile(r"^\s*## @param (?P<name>[\w.]+)(?: \[(?P<tag>\w+)\])? (?P<doc>.+)$")
HEADER = "| Name | Description | Default |"
SECTION = re.compile(r"^## @section (?P<title>.+)$")


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def params() -> list[tuple[str, str, str]]:
    """(section, name, description) in file order."""
    out, section = [], ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        if m := SECTION.match(line):
            section = m["title"]
        elif m := PARAM.match(line):
            out.append((section, m["name"], m["doc"]))
    return out


def lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            raise KeyError(dotted)
        tree = tree[key]
    return tree


def leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += leaves(value, f"{path}.") if isinstance(value, dict) and value else [path]
    return out


def default_text(value: Any) -> str:
    return "`" + json.dumps(value, separators=(",", ":")) + "`"


def table() -> str:
    rows, section = [], None
    tree = values()
    for sec, name, doc in params():
        if sec != section:
            rows += ["", f"### {sec}", "", HEADER, "| --- | --- | --- |"]
            section = sec
        rows.append(f"| `{name}` | {doc} | {default_text(lookup(tree, name))} |")
    return "\n".join(rows).strip() + "\n"


def test_every_param_names_a_value() -> None:
    tree = values()
    for _, name, _ in params():
        lookup(tree, name)


def test_every_value_is_documented() -> None:
    documented = {name for _, name, _ in params()}
    for leaf in leaves(values()):
        parts = leaf.split(".")
        covering = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        assert covering & documented, f"{leaf} has no ## @param"


def test_values_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values())
    for case in ("full", "kind"):
        overrides = yaml.safe_load((CHART / "ci" / f"{case}-values.yaml").read_text())
        merged = _merge(values(), overrides)
        jsonschema.Draft7Validator(schema).validate(merged)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if both else value
    return out


def test_schema_knows_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values()) <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_readme_table_is_current() -> None:
    readme = (CHART / "README.md").read_text()
    assert table() in readme, "regenerate: python tests/unit/test_chart_docs.py"


def test_readme_says_how_the_crd_is_upgraded() -> None:
    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Upgrading the CRD") :].split("\n## ")[0]
    assert "`helm upgrade` alone upgrades the CRD" in section
    assert "`pre-install,pre-upgrade` hook" in section
    # The one extra step there is, and when: a CRD kubectl applied before.
    assert "--force-conflicts" in section
    hook = (CHART / "templates" / "crds.yaml").read_text()
    assert '"helm.sh/hook" "pre-install,pre-upgrade"' in hook


if __name__ == "__main__":
    sys.stdout.write(table())
