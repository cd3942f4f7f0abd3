"""Fusion and the category weights table: the inner product of a fused product vector with a
query is exactly w_img * cos_img + w_txt * cos_txt with the product's own category weights."""

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgembed.catalog import fusion
from imgembed.catalog.weights import Weights, WeightsTable, findly_table, load_weights
from imgembed.errors import ConfigurationError

TABLE = findly_table()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    image_dim=st.sampled_from([8, 64, 512, 1280]),
    text_dim=st.sampled_from([16, 384, 1536]),
    scale=st.floats(0.01, 100),
)
def test_inner_product_is_the_weighted_sum_of_cosines_for_every_category(
    seed, image_dim, text_dim, scale
):
    rng = np.random.default_rng(seed)
    image, query_image = rng.standard_normal((2, image_dim)) * scale  # any length: unit parts
    text, query_text = rng.standard_normal((2, text_dim)) * scale
    cos_image = image @ query_image / np.linalg.norm(image) / np.linalg.norm(query_image)
    cos_text = text @ query_text / np.linalg.norm(text) / np.linalg.norm(query_text)
    query = fusion.query(query_image, query_text)
    assert query.shape == (image_dim + text_dim,)  # concatenated: never averaged or padded
    for category, weights in TABLE.categories.items():
        combined = fusion.fuse(image, text, weights, image_dim, text_dim)
        expected = weights.image * cos_image + weights.text * cos_text
        assert float(combined @ query) == pytest.approx(expected, abs=1e-6), category
        assert fusion.score(weights, cos_image, cos_text) == pytest.approx(expected, abs=1e-12)
        # without an image the image part is zero: cos_img counts as 0
        text_only = fusion.fuse(None, text, weights, image_dim, text_dim)
        assert not text_only[:image_dim].any()
        assert float(text_only @ query) == pytest.approx(weights.text * cos_text, abs=1e-6)


def test_the_findly_table_and_its_aliases():
    assert TABLE.weights("fashion") == ("fashion", Weights(0.75, 0.25))
    assert TABLE.weights("Interieur") == ("interior", Weights(0.75, 0.25))
    assert TABLE.weights("sieraden") == ("jewellery", Weights(0.55, 0.45))
    assert TABLE.weights("Tech") == ("tech", Weights(0.55, 0.45))
    assert TABLE.weights("  KLEDING ") == ("fashion", Weights(0.75, 0.25))
    assert TABLE.key("Dames kleding") == "fashion"  # a word of it that the table knows
    assert TABLE.key("Home & Garden") == "interior"
    assert TABLE.key("posters") == TABLE.key(None) == TABLE.key("") == "general"
    assert TABLE.categories["general"] == Weights(0.60, 0.40)


def test_weights_file_adds_and_replaces_categories(tmp_path):
    toml = tmp_path / "weights.toml"
    toml.write_text(
        'default = "general"\n'
        "[categories.fashion]\nimage = 0.9\ntext = 0.1\n"
        '[categories.books]\nimage = 0.2\ntext = 0.8\naliases = ["boeken", "Bücher"]\n'
        "[categories.home]\nimage = 0.7\ntext = 0.3\n"
    )
    table = load_weights(toml)
    assert table.weights("kleding") == ("fashion", Weights(0.9, 0.1))  # old alias, new weights
    assert table.weights("BÜCHER") == ("books", Weights(0.2, 0.8))
    assert table.key("home") == "home"  # was an alias of interior: now its own category
    assert table.key("interieur") == "interior"
    assert table.version != TABLE.version
    as_json = tmp_path / "weights.json"
    categories = {
        "fashion": {"image": 0.9, "text": 0.1},
        "books": {"image": 0.2, "text": 0.8, "aliases": ["boeken", "Bücher"]},
        "home": {"image": 0.7, "text": 0.3},
    }
    as_json.write_text(json.dumps({"categories": categories}))
    assert load_weights(as_json).version == table.version  # same table, same version
    assert load_weights(None).version == TABLE.version


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[categories.x]\nimage = 0.7\ntext = 0.7\n", "must add up to 1"),
        ("[categories.x]\nimage = -0.5\ntext = 1.5\n", r"in \[0, 1\]"),
        ("[categories.x]\nimage = 0.5\n", "numeric 'image' and 'text'"),
        ("[categories.x]\nimage = 0.5\ntext = 0.5\nweight = 1\n", "takes 'image', 'text'"),
        ('default = "nothing"\n', "default category 'nothing'"),
        ("categorys = 1\n", "expected keys"),
        ("[categories.x]\nimage = 0.5\ntext = 0.5\naliases = ['fashion']\n", "also a category"),
        ("not toml at all [", "cannot read category weights"),
        # was taken letter by letter: "t", "o", "y", "s" were aliases, "toys" was not
        ("[categories.x]\nimage = 0.5\ntext = 0.5\naliases = 'toys'\n", "a list of names"),
        ("[categories.x]\nimage = 0.5\ntext = 0.5\naliases = [true]\n", "a list of names"),
        (
            "[categories.a]\nimage = 0.5\ntext = 0.5\naliases = ['x']\n"
            "[categories.b]\nimage = 0.5\ntext = 0.5\naliases = ['X']\n",
            "alias 'x' is given to both 'a' and 'b'",
        ),
    ],
)
def test_bad_weights_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "w.toml"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        load_weights(path)


def test_an_alias_taken_from_a_built_in_category_is_said(tmp_path, caplog):
    path = tmp_path / "w.toml"
    path.write_text("[categories.dames]\nimage = 0.8\ntext = 0.2\naliases = ['kleding']\n")
    logger = logging.getLogger("imgembed.catalog")  # the CLI's --verbose stops propagation
    logger.addHandler(caplog.handler)
    try:
        assert load_weights(path).key("kleding") == "dames"  # the file decides
    finally:
        logger.removeHandler(caplog.handler)
    assert "alias 'kleding' now names 'dames', not 'fashion'" in caplog.text


def test_missing_weights_file():
    with pytest.raises(ConfigurationError, match="cannot read category weights"):
        load_weights("/nonexistent/weights.toml")


def test_fuse_refuses_vectors_it_cannot_normalise_or_place():
    weights = Weights(0.6, 0.4)
    with pytest.raises(ConfigurationError, match="zero"):
        fusion.fuse(np.zeros(4), np.ones(3), weights, 4, 3)
    with pytest.raises(ConfigurationError, match="non-finite"):
        fusion.fuse(np.ones(4), [1.0, np.nan, 0.0], weights, 4, 3)
    with pytest.raises(ConfigurationError, match="image embedding has 5 dimensions, expected 4"):
        fusion.fuse(np.ones(5), np.ones(3), weights, 4, 3)
    with pytest.raises(ConfigurationError, match="text embedding has 2 dimensions, expected 3"):
        fusion.fuse(np.ones(4), np.ones(2), weights, 4, 3)
    with pytest.raises(ConfigurationError, match="text embedding has 4 dimensions, expected 3"):
        fusion.fuse(None, np.ones(4), weights, 4, 3)


def test_a_table_is_checked_when_built():
    with pytest.raises(ConfigurationError, match="names no category"):
        WeightsTable({"general": Weights(0.6, 0.4)}, {"x": "missing"})


@pytest.mark.parametrize(("image", "text"), [(0.6, 0.45), (0.3, 0.3), (0.5, 0.49)])
def test_weights_that_do_not_add_up_to_1_are_refused_above_or_below(tmp_path, image, text):
    """A category whose weights add up to 1.05 or 0.6 scored on another scale than the rest
    (its products ranked above or below others for the weights alone)."""
    path = tmp_path / "w.toml"
    path.write_text(f"[categories.x]\nimage = {image}\ntext = {text}\n")
    with pytest.raises(ConfigurationError, match="must add up to 1"):
        load_weights(path)
    path.write_text("[categories.x]\nimage = 0.1\ntext = 0.9\n")  # 0.1 + 0.9 in floats: fine
    assert load_weights(path).weights("x") == ("x", Weights(0.1, 0.9))


def test_a_weights_file_names_categories_aliases_and_default_in_any_case_and_spacing(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text(
        'default = "Fashion"\n'  # the file's default: a category of the table, in any case
        "[categories.'Home  Office']\nimage = 0.3\ntext = 0.7\n"
        "[categories.Books]\nimage = 0.2\ntext = 0.8\naliases = [123, 'Fußball']\n"
    )
    table = load_weights(path)
    assert table.default == "fashion"
    # an unknown category takes the file's default, not the built-in 'general'
    assert table.weights("posters") == ("fashion", Weights(0.75, 0.25))
    assert table.weights(None) == ("fashion", Weights(0.75, 0.25))
    assert table.weights("BOOKS") == ("books", Weights(0.2, 0.8))
    # a name of two words, spaced as a product's category may be: not its first word 'home'
    assert table.weights(" home   office ") == ("home office", Weights(0.3, 0.7))
    assert table.key("123") == "books"  # a category code as an alias
    assert table.key("FUSSBALL") == "books"  # 'ß' in upper case is 'SS'


def test_the_first_word_of_a_category_that_the_table_knows_decides():
    assert TABLE.key("Kleding & elektronica") == "fashion"
    assert TABLE.key("elektronica, kleding") == "tech"


def test_the_table_version_changes_with_its_aliases_and_its_default():
    """The version is how a store's stats tell that its weights changed since its last run:
    an alias moved to another category or another default reweighs products too."""
    categories = dict(TABLE.categories)
    base = WeightsTable(categories, {"kleding": "fashion"})
    moved = WeightsTable(categories, {"kleding": "interior"})
    other_default = WeightsTable(categories, {"kleding": "fashion"}, default="tech")
    versions = {base.version, moved.version, other_default.version}
    assert len(versions) == 3
    assert WeightsTable(dict(categories), {"kleding": "fashion"}).version == base.version


def test_the_score_of_a_product_without_an_image_counts_its_image_cosine_as_0():
    weights = Weights(0.75, 0.25)
    rng = np.random.default_rng(7)
    text, query_image, query_text = rng.standard_normal((3, 8))
    cos_text = float(fusion.unit(text, "t") @ fusion.unit(query_text, "q"))
    text_only = fusion.fuse(None, text, weights, 8, 8)
    assert fusion.score(weights, None, cos_text) == pytest.approx(0.25 * cos_text, abs=1e-12)
    assert float(text_only @ fusion.query(query_image, query_text)) == pytest.approx(
        fusion.score(weights, None, cos_text), abs=1e-6
    )
    assert fusion.score(weights, 0.5, -0.2) == pytest.approx(0.75 * 0.5 - 0.25 * 0.2)
