"""A byte-level BPE tokenizer trained on ShareGPT text, saved in Hugging Face format.

Byte-level, so any text round-trips; trained on the first `train_chars` characters of ShareGPT
V3 (file order, one thread), so the same preset always gives the same vocabulary and merges.
"""

import os
from pathlib import Path

from edgeprompt_vllm.data.sharegpt import iter_texts

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]  # ids 0..5, in this order


def train_tokenizer(vocab_size: int, train_chars: int, chat_template: str, out_dir: Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`."""
    # NOTE: one thread, so merges cannot depend on how the work was split; set before import.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(train_chars), trainer=trainer)
    # Plain text prompts start with BOS, as Llama's tokenizer does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, model_max_length=1 << 30,
    )
    hf.chat_template = chat_template
    hf.save_pretrained(str(out_dir))
