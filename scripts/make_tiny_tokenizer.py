"""Rebuild the bundled tiny tokenizer (flamingo_cli/assets/tiny/tokenizer).

A byte-level BPE trained on scripts/tiny_corpus.txt: the Preamble of the United States
Constitution and the Gettysburg Address (Bliss copy), both in the public domain, followed by
caption-style sentences written for this project. Llama-style special tokens (<s>, </s>,
<unk>) and no pad token, so `<PAD>` is added after the Flamingo tokens as OpenFlamingo does.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 512


def main() -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (ROOT / "scripts" / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(text, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(ROOT / "flamingo_cli" / "assets" / "tiny" / "tokenizer")


if __name__ == "__main__":
    main()
