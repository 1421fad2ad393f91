"""Every YAML example in docs/ passes `probec check`; the JSON Schema accepts every spec. (Specs are
```yaml blocks; other YAML, such as CI configuration, is fenced ```yml.)"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import ROOT
from probec.compiler.driver import check_file

class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans, as editors read them: only true/false. (YAML 1.1 reads `on` as true.)"""


Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))

DOCS = sorted((ROOT / "docs").glob("*.md"))
EXAMPLES = [(doc, i, block) for doc in DOCS
            for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S))]


@pytest.mark.parametrize("doc,index,block", EXAMPLES, ids=[f"{d.name}#{i}" for d, i, _ in EXAMPLES])
def test_doc_example_checks(doc, index, block, tmp_path, workloads):
    # Examples use paths relative to a spec in examples/NAME/, like the bundled ones.
    spec = ROOT / "examples" / "inference" / f".doc_{doc.stem}_{index}.yaml"
    spec.write_text(block)
    try:
        result = check_file(str(spec))
    finally:
        spec.unlink()
    errors = [d for d in result.diagnostics.items if d.severity.value == "error"]
    assert not errors, "\n".join(f"{d.code} {d.message}" for d in errors)


def test_schema_accepts_every_spec():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the test extra: pip install -e .[test]")
    schema = json.loads((ROOT / "docs" / "spec.schema.json").read_text())
    specs = list((ROOT / "specs").glob("*.yaml")) + list((ROOT / "examples").glob("*/spec.yaml"))
    assert specs
    for path in specs:
        jsonschema.validate(yaml.load(path.read_text(), Loader=Yaml12Loader), schema)
