import json
import random
import textwrap
from pathlib import Path

import pytest

from cai.constitution import json_schema, lint, load_constitution
from cai.yamlio import SpecError

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: tiny
version: 1
principles:
  - id: a
    critique: find harm
    revision: remove harm
    judge: which is less harmful?
    weight: 3
  - id: b
    critique: find lies
    revision: remove lies
    judge: which is more honest?
examples:
  - principle: a
    prompt: p
    response: r
    critique: c
    revision: v
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("name", ["harmless.yaml", "helpful-honest.yaml"])
def test_shipped_constitutions_are_valid(name):
    c = load_constitution(REPO / "constitutions" / name)
    assert len(c.principles) >= (12 if name == "harmless.yaml" else 8)
    assert len({p.id for p in c.principles}) == len(c.principles)


def test_harmless_covers_required_topics():
    c = load_constitution(REPO / "constitutions" / "harmless.yaml")
    text = " ".join(f"{p.id} {' '.join(p.tags)} {p.critique}" for p in c.principles).lower()
    for topic in ["harm", "decept", "privacy", "illegal", "manipulat", "evasive"]:
        assert topic in text, topic


def test_good_file_loads_and_hash_ignores_formatting(tmp_path):
    a = load_constitution(write(tmp_path, GOOD, "a.yaml"))
    b = load_constitution(write(tmp_path, "# a comment\n" + GOOD.replace("find harm", "'find harm'"), "b.yaml"))
    assert a.version == "1"  # numbers become text
    assert a.hash == b.hash
    c = load_constitution(write(tmp_path, GOOD.replace("find harm", "find any harm"), "c.yaml"))
    assert c.hash != a.hash
    assert a.text.startswith("name: tiny")


def test_every_problem_reported_with_line_and_field(tmp_path):
    bad = """\
    name: bad
    version: 1
    principles:
      - id: a
        critique: ""
        revision: fix it
        judge: which?
        weigth: 2
      - id: a
        critique: x
        revision: y
        judge: z
        weight: -1
        tags: foo
      - id: c
        revision: y
        judge: z
    examples:
      - principle: nope
        prompt: p
        response: r
        critique: c
        revision: v
    """
    problems = lint(write(tmp_path, bad))
    found = {(p.line, p.field) for p in problems}
    assert (5, "principles[0].critique") in found  # empty request
    assert (8, "principles[0].weigth") in found  # unknown key (typo)
    assert (9, "principles[1].id") in found  # duplicate id
    assert (13, "principles[1].weight") in found  # wrong value
    assert (14, "principles[1].tags") in found  # wrong type
    assert (15, "principles[2].critique") in found  # missing field -> line of its item
    assert (19, "examples[0].principle") in found  # dangling reference
    text = "\n".join(map(str, problems))
    assert "c.yaml:9: principles[1].id: duplicate principle id 'a'" in text
    assert "unknown key" in text and "must not be empty" in text


def test_not_yaml_and_wrong_shapes(tmp_path):
    (p,) = lint(write(tmp_path, "name: x\n  bad: [\n"))
    assert p.line == 2 and "not valid YAML" in p.message
    (p,) = lint(write(tmp_path, "- a\n- b\n"))
    assert "expected a mapping" in p.message
    (p,) = lint(write(tmp_path, ""))
    assert "empty file" in p.message
    problems = lint(write(tmp_path, "name: x\nname: y\nversion: 1\nprinciples: []\n"))
    assert any(p.line == 2 and "duplicate key" in p.message for p in problems)
    assert lint(tmp_path / "missing.yaml")[0].message == "file not found"


def test_yaml_is_loaded_safely(tmp_path):
    evil = GOOD.replace("name: tiny", "name: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(SpecError) as e:
        load_constitution(write(tmp_path, evil))
    assert "not valid YAML" in str(e.value)


def test_weighted_sampling_is_seeded_and_follows_weights(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    draws = [p.id for p in c.sample_principles(4000, random.Random(7))]
    assert draws == [p.id for p in c.sample_principles(4000, random.Random(7))]
    share_a = draws.count("a") / len(draws)
    assert 0.72 < share_a < 0.78  # weight 3 vs 1 -> 0.75


def test_json_schema_describes_principles():
    schema = json_schema()
    json.dumps(schema)
    principle = schema["$defs"]["Principle"]
    assert set(principle["required"]) == {"id", "critique", "revision", "judge"}
    assert principle["additionalProperties"] is False


def test_contrast_block_problems_have_file_line_and_field(tmp_path):
    bad = """\
    name: bad
    version: 1
    principles:
      - id: a
        critique: x
        revision: y
        judge: z
        contrast:
          follow: Be safe.
      - id: b
        critique: x
        revision: y
        judge: z
        contrast:
          follow: Be safe.
          violate: Be safe.
      - id: c
        critique: x
        revision: y
        judge: z
        contrast:
          follow: ""
          violate: Be harmful.
          folow: typo
      - id: d
        critique: x
        revision: y
        judge: z
        contrast: be nice
    """
    path = write(tmp_path, bad)
    problems = lint(path)
    found = {(p.line, p.field) for p in problems}
    assert (8, "principles[0].contrast.violate") in found  # missing -> line of the block
    assert (16, "principles[1].contrast.violate") in found  # same text as follow
    assert (22, "principles[2].contrast.follow") in found  # empty
    assert (24, "principles[2].contrast.folow") in found  # unknown key
    assert (29, "principles[3].contrast") in found  # not a mapping
    text = "\n".join(map(str, problems))
    assert f"{path}:16: principles[1].contrast.violate: contrast.follow and contrast.violate are the same" in text


def test_shipped_principles_all_have_contrast_blocks():
    for name in ("harmless.yaml", "helpful-honest.yaml"):
        c = load_constitution(REPO / "constitutions" / name)
        for p in c.principles:
            assert p.contrast is not None, (name, p.id)
            assert p.contrast.follow != p.contrast.violate


def test_hash_of_a_file_without_contrast_blocks_is_unchanged(tmp_path):
    # A file without contrast blocks hashes as it did before the field existed (stored rows keep matching).
    c = load_constitution(write(tmp_path, GOOD))
    data = c.model_dump(mode="json")
    for p in data["principles"]:
        del p["contrast"]
    import hashlib
    assert c.hash == hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
