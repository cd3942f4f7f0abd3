import numpy as np
import pytest

from imgembed import ConfigurationError
from imgembed.engine import similarity


def test_cosine_matches_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=16), rng.normal(size=16)
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert similarity.cosine_similarity(a, b) == pytest.approx(expected, abs=1e-6)
    assert similarity.cosine_similarity(a, 3 * a) == pytest.approx(1, abs=1e-6)
    assert similarity.cosine_similarity(a, -a) == pytest.approx(-1, abs=1e-6)


def test_one_vs_many_is_vectorised_and_ordered():
    rng = np.random.default_rng(1)
    query, candidates = rng.normal(size=8), rng.normal(size=(100, 8))
    scores = similarity.cosine_similarities(query, candidates)
    assert scores.shape == (100,)
    for i in (0, 50, 99):
        assert scores[i] == pytest.approx(
            similarity.cosine_similarity(query, candidates[i]), abs=1e-6
        )


def test_top_k_best_first_with_stable_ties():
    scores = np.array([0.1, 0.9, 0.5, 0.9, -0.2])
    assert similarity.top_k(scores, 3).tolist() == [1, 3, 2]
    assert similarity.top_k(scores, 10).tolist() == [1, 3, 2, 0, 4]
    assert similarity.top_k(scores, 0).tolist() == []


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="expected"):
        similarity.cosine_similarities([1, 0], [[1, 0, 0]])


def test_zero_vectors_do_not_produce_nan():
    assert np.isfinite(similarity.cosine_similarities([0, 0], [[1, 0], [0, 0]])).all()


def test_empty_and_non_finite_embeddings_are_clear_errors():
    with pytest.raises(ConfigurationError, match="empty"):
        similarity.cosine_similarity([], [])
    with pytest.raises(ConfigurationError, match="finite"):
        similarity.cosine_similarity([1.0, float("nan")], [1.0, 0.0])
    with pytest.raises(ConfigurationError, match="finite"):
        similarity.cosine_similarities([1.0, 0.0], [[0.0, float("inf")]])
    assert similarity.cosine_similarities([1.0, 0.0], []).shape == (0,)  # no candidates: none


def test_failed_items_and_ragged_candidates_are_clear_errors():
    # batch_generate_embeddings gives None for an image that failed; the seed's example feeds
    # its list straight in
    with pytest.raises(ConfigurationError, match=r"candidate 1 is None .*leave failed items out"):
        similarity.cosine_similarities([1.0, 0.0], [[1.0, 0.0], None])
    with pytest.raises(ConfigurationError, match=r"one length \(lengths given: \[2, 3\]\)"):
        similarity.cosine_similarities([1.0, 0.0], [[1.0, 0.0], [1.0, 0.0, 0.0]])
    with pytest.raises(ConfigurationError, match="differ in length: 2 and 3"):
        similarity.cosine_similarity([1.0, 2.0], [1.0, 2.0, 3.0])


def test_scores_stay_within_minus_one_and_one():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 512)).astype(np.float32)
    scores = [similarity.cosine_similarities(v, [v, -v]) for v in vectors]
    assert all(s[0] <= 1.0 and s[1] >= -1.0 for s in scores)
    assert min(s[0] for s in scores) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1e-25, 1e-40, 1e200])
def test_tiny_and_huge_finite_embeddings_keep_their_direction(scale):
    """float32 squared 1e-25 to zero (cosine 0 for the same vector) and cast 1e200 to
    infinity ("NaN or infinity given" for finite numbers)."""
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    scores = similarity.cosine_similarities(scale * a, [scale * a, scale * b])
    np.testing.assert_allclose(scores, [1.0, expected], atol=1e-6)
    with np.errstate(over="ignore"):
        small = (scale * a).astype(np.float32)  # an array already in float32
    if np.isfinite(small).all() and (small != 0).all():
        assert similarity.cosine_similarities(small, small[None, :])[0] == pytest.approx(1)


def test_what_is_not_a_vector_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="query embedding must be a list of numbers"):
        similarity.cosine_similarities("abc", [[1, 2, 3]])
    with pytest.raises(ConfigurationError, match="text, None or a number too large in a row"):
        similarity.cosine_similarities([1, 2, 3], [[1, 2, "x"]])
    with pytest.raises(ConfigurationError, match="a list of numbers, not NoneType"):
        similarity.cosine_similarities(None, [[1, 2]])  # was "NaN or infinity given"
    with pytest.raises(ConfigurationError, match="a number too large"):
        similarity.cosine_similarities([10**400, 1], [[1, 1]])  # was a bare OverflowError


def test_what_holds_no_embeddings_is_a_clear_error():
    """These were bare TypeErrors from len() or iteration, or named wrong 'lengths'."""
    for nothing in (None, (x for x in [1.0, 2.0]), {"a": 1.0}):
        with pytest.raises(ConfigurationError, match="first embedding"):
            similarity.cosine_similarity(nothing, [1.0, 2.0])
    for nothing in (None, 3, "abc"):
        with pytest.raises(ConfigurationError, match="a list or matrix of embeddings, not"):
            similarity.cosine_similarities([1.0, 0.0], nothing)
    # a dict (its keys were counted as 'lengths given: [1, 2]')
    with pytest.raises(ConfigurationError, match=r"not a dict \(find_similar_images takes"):
        similarity.cosine_similarities([1.0, 0.0], {"a": [1.0, 0.0], "bb": [0.0, 1.0]})
    with pytest.raises(ConfigurationError, match=r"one embedding, not shape \(2, 2\)"):
        similarity.cosine_similarities([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0, 0.0, 0.0]])


def test_torch_tensors_and_generators_of_candidates():
    torch = pytest.importorskip("torch")
    rows = [[1.0, 0.0], [0.0, 1.0]]
    assert similarity.cosine_similarities([1.0, 0.0], (r for r in rows)).tolist() == [1.0, 0.0]
    assert similarity.cosine_similarities(
        torch.tensor([1.0, 0.0]), torch.tensor(rows)
    ).tolist() == [
        1.0,
        0.0,
    ]
    graph = torch.tensor(rows, requires_grad=True)  # was torch's RuntimeError
    with pytest.raises(ConfigurationError, match=r"cannot be read: .*detach"):
        similarity.cosine_similarities([1.0, 0.0], graph)
    with pytest.raises(ConfigurationError, match=r"cannot be read: .*detach"):
        similarity.cosine_similarity(graph[0], [1.0, 0.0])


def test_embeddings_of_negative_numbers_only_keep_their_sign():
    """Lists are scaled by their largest magnitude before float32: a row of negative numbers
    only must not be divided by its (negative) largest value, which flips its direction."""
    negative, positive = [-1.0, -2.0, -3.0], [1.0, 2.0, 3.0]
    assert similarity.cosine_similarity(negative, positive) == pytest.approx(-1, abs=1e-6)
    assert similarity.cosine_similarity(positive, negative) == pytest.approx(-1, abs=1e-6)
    scores = similarity.cosine_similarities(negative, [positive, negative, [3.0, 0.0, 0.0]])
    np.testing.assert_allclose(scores, [-1.0, 1.0, -1 / np.sqrt(14)], atol=1e-6)
    assert similarity.top_k(scores, 3).tolist() == [1, 2, 0]


def test_a_top_k_beyond_any_store_asks_for_every_item_within_postgres_limit():
    assert similarity.checked_top_k(5) == 5
    assert similarity.checked_top_k(np.int64(3)) == 3
    assert similarity.checked_top_k(2**63 - 1) == 2**63 - 1
    assert similarity.checked_top_k(10**30) == 2**63 - 1  # PostgreSQL's LIMIT is a bigint


def test_top_k_takes_the_first_of_the_scores_tied_at_its_cut():
    """argpartition took any of the scores tied with the k-th highest: of two copies of the
    same image the later one could be a result and the earlier one left out."""
    # two candidates, each given twice: the best is the first copy (was index 3)
    query, candidates = [1.0, 0.0], [[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    scores = similarity.cosine_similarities(query, candidates)
    assert similarity.top_k(scores, 1).tolist() == [2]
    assert similarity.top_k(scores, 3).tolist() == [2, 3, 0]
    rng = np.random.default_rng(0)
    for _ in range(500):
        scores = rng.integers(0, 4, size=int(rng.integers(1, 40))).astype(np.float32)
        stable = np.argsort(-scores, kind="stable")
        for k in (1, len(scores) // 2, len(scores) - 1):
            assert similarity.top_k(scores, k).tolist() == stable[: max(k, 0)].tolist()
