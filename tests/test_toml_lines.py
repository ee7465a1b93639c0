from flamingo_cli.recipe.toml_lines import key_lines, line_of

DOC = '''\
# comment
title = "x"
[model]
lm_path = "a"  # trailing
"quoted key" = 1

[data.laion]
shards = [
  "a.tar",
  "b.tar",
]
batch_size = 8
notes = """
fake = 1
[fake.table]
"""
inline = { a = 1, b.c = 2 }
physical.dotted = true
[[runs]]
name = "first"
[[runs]]
name = "second"
'''


def test_every_key_maps_to_its_line() -> None:
    lines = key_lines(DOC)
    assert lines == {
        "title": 2,
        "model": 3,
        "model.lm_path": 4,
        "model.quoted key": 5,
        "data.laion": 7,
        "data.laion.shards": 8,
        "data.laion.batch_size": 12,
        "data.laion.notes": 13,
        "data.laion.inline": 17,
        "data.laion.inline.a": 17,
        "data.laion.inline.b.c": 17,
        "data.laion.physical": 18,
        "data.laion.physical.dotted": 18,
        "runs.0": 19,
        "runs.0.name": 20,
        "runs.1": 21,
        "runs.1.name": 22,
    }


def test_line_of_falls_back_to_the_parent_table() -> None:
    lines = key_lines(DOC)
    assert line_of(lines, "data.laion.workers") == 7
    assert line_of(lines, "optim.lr") is None
