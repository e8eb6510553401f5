import pytest

from edgeqwen.errors import RecipeError, UsageError
from edgeqwen.recipes import GGUF_QUANTS, NEEDS_IMATRIX, NOT_FOR_DENSE, get_recipe, load_recipes, parse_recipe


def test_shipped_recipes_parse_with_the_qwen2_shapes():
    r = load_recipes()
    for size in ("0.5b", "1.5b", "7b"):
        assert get_recipe(size).name == f"qwen2-{size}"
    assert get_recipe("0.5b").tied_embeddings and get_recipe("1.5b").tied_embeddings
    assert not get_recipe("7b").tied_embeddings
    assert get_recipe("7b").hub_repo == "Qwen/Qwen2-7B-Instruct"
    assert r["qwen2-1.5b"].config["num_hidden_layers"] == 28


@pytest.mark.parametrize("given,want", [("q4", "q4_k_m"), ("Q8", "q8_0"), ("f16", "f16"), ("bf16", "bf16"),
                                        ("q2_k", "q2_k"), ("iq4_nl", "iq4_nl"), ("q6_k", "q6_k")])
def test_quant_aliases_and_llama_cpp_names(given, want):
    assert get_recipe("1.5b").resolve_quant(given) == want


def test_every_llama_cpp_file_type_is_known_by_name():
    r = get_recipe("0.5b")
    for q in GGUF_QUANTS:
        if q in NEEDS_IMATRIX or q in NOT_FOR_DENSE:
            with pytest.raises(UsageError):
                r.resolve_quant(q)
        else:
            assert r.resolve_quant(q) == q


def test_unknown_quant_and_size_list_the_choices():
    with pytest.raises(UsageError, match="q4_k_m.*"):
        get_recipe("0.5b").resolve_quant("q5")
    with pytest.raises(UsageError, match=r"0\.5b.*1\.5b.*7b"):
        get_recipe("3b")


@pytest.mark.parametrize("mutation,message", [
    (lambda s: 'colour = "red"\n' + s, "unknown key"),
    (lambda s: s.replace('arch = "qwen2"', 'arch = "llama"'), "unknown arch"),
    (lambda s: s.replace("hidden_size = 256\n", ""), "lacks hidden_size"),
    (lambda s: s.replace('q4 = "q4_k_m"', 'q4 = "q4_z"'), "not a quant type"),
    (lambda s: s.replace("tied_embeddings = true", 'tied_embeddings = "yes"'), "must be a bool"),
])
def test_recipes_are_parsed_strictly(tmp_path, mutation, message):
    from helpers import TINY_RECIPE
    p = tmp_path / "bad.toml"
    p.write_text(mutation(TINY_RECIPE))
    with pytest.raises(RecipeError, match=message):
        parse_recipe(p)
