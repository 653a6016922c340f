"""The released Magpie builds G2P tokenizers for every language it was trained on when
it loads, whichever language is spoken; these need packages beyond NeMo's asr extra."""

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "nemo.collections.tts.g2p.models.zh_cn_pinyin",  # mandarin_phoneme
        "jieba",  # its word segmenter, imported when it is built
        "pypinyin",
        "pypinyin_dict.pinyin_data.cc_cedict",
        "nemo.collections.tts.g2p.models.ja_jp_ipa",  # japanese_phoneme (imports pyopenjtalk)
    ],
)
def test_the_released_magpies_tokenizers_can_be_built(module):
    importlib.import_module(module)
