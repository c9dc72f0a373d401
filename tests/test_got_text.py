"""GoT text parsing / formatting: released format, clamping, strict errors, colours, round trips."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ImageColor

from got_jax.got.text import Box, GotTextError, Plan, format_got, parse_got, parse_got_report

RELEASED = ("The scene: <|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|> (red)"
            " next to <|object_ref_start|>a blue cup<|object_ref_end|><|box_start|>(500,100),(900,950)<|box_end|> (blue)."
            " Also <|box_start|>(1,2),(3,4)<|box_end|>.")


def test_matches_released_regex_on_coloured_boxes():
    import re

    from got_reference import RELEASED_BOX_PATTERN

    boxes = parse_got(RELEASED)
    ours = [(b.x1, b.y1, b.x2, b.y2, b.color) for b in boxes if b.color is not None]
    theirs = [tuple(int(v) for v in m[:4]) + (m[4],) for m in re.findall(RELEASED_BOX_PATTERN, RELEASED)]
    assert ours == theirs and len(theirs) == 2
    # the uncoloured box (which the released code does not paint) is kept, without colour
    assert len(boxes) == 3 and boxes[2].color is None
    # phrases: the text between the object_ref markers right before each box
    assert [b.phrase for b in boxes] == re.findall(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", RELEASED) + [None]


def test_clamp_drop_and_report():
    text = "<|box_start|>(-5,20),(1200,400)<|box_end|> (red) <|box_start|>(50,50),(50,60)<|box_end|> (blue)"
    boxes, problems = parse_got_report(text)
    assert boxes == [Box(0, 20, 1000, 400, None, "red")]
    assert len(problems) == 2 and "clamped" in problems[0] and "x1=50 >= x2=50" in problems[1]


@pytest.mark.parametrize("text, reason", [
    ("<|box_start|>(300,20),(100,400)<|box_end|>", "x1=300 >= x2=100"),
    ("<|box_start|>(10,400),(100,400)<|box_end|>", "y1=400 >= y2=400"),
    ("<|box_start|>(10,20),(1001,400)<|box_end|>", "outside 0..1000"),
    ("<|box_start|>(10,20),(100,400)<|box_end|> (notacolour)", "unknown colour 'notacolour'"),
])
def test_strict_errors_name_box_and_reason(text, reason):
    with pytest.raises(GotTextError) as e:
        parse_got(text, strict=True)
    assert reason in str(e.value) and "<|box_start|>" in str(e.value)


def test_unknown_colour_falls_back_to_white():
    boxes, problems = parse_got_report("<|box_start|>(10,20),(100,400)<|box_end|> (notacolour)")
    assert boxes[0].color == "white" and "notacolour" in problems[0]


def test_colour_whitespace_variants_and_rgb():
    for sep in ["", " ", "  ", "\n"]:
        (box,) = parse_got(f"<|box_start|>(10,20),(100,400)<|box_end|>{sep}(darkgreen)")
        assert box.color == "darkgreen" and box.rgb() == ImageColor.getrgb("darkgreen")


def test_plan_round_trip():
    boxes = parse_got(RELEASED)
    plan = Plan(tuple(boxes), segments=("The scene: ", " next to ", ". Also "), tail=".")
    assert plan.to_text() == RELEASED
    assert parse_got(format_got(plan)) == boxes


FRAGMENTS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "(", ")", ",", " ",
             "\n", "-", "1000", "0", "999999999999999", "12", "red", "(red)", "(foo)", "<|", "|>", "a cat"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.integers(-2000, 2000).map(str), st.text(max_size=5)),
                max_size=40))
def test_non_strict_never_raises(parts):
    text = "".join(parts)
    boxes, problems = parse_got_report(text)
    assert boxes == parse_got(text)
    for b in boxes:
        b.validate()  # every returned box is valid


_colors = st.sampled_from([None, "red", "blue", "darkgreen", "white", "#ff8800"])
_phrases = st.one_of(st.none(), st.text(st.characters(blacklist_characters="<|"), max_size=12))


@st.composite
def _boxes(draw):
    x1 = draw(st.integers(0, 999))
    y1 = draw(st.integers(0, 999))
    return Box(x1, y1, draw(st.integers(x1 + 1, 1000)), draw(st.integers(y1 + 1, 1000)), draw(_phrases),
               draw(_colors))


@settings(max_examples=200, deadline=None)
@given(st.lists(_boxes(), max_size=6), st.text(st.characters(blacklist_characters="<|"), max_size=10))
def test_format_round_trip(boxes, prefix):
    text = format_got(boxes, prefix + " ")
    assert parse_got(text, strict=True) == boxes
