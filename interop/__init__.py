"""Hugging Face interop: models and tokenizers in and out of the Hugging Face format (`minigpt import`,
`minigpt export`, `init.from`, `prepare --tokenizer RUN_OR_HF_FOLDER`).

    hf_models.py     the architecture map: config.json <-> GPTConfig, HF weight names <-> ours
    hf_files.py      reading a model folder's weights lazily (safetensors, sharded, pytorch_model.bin) and writing them
    hf_tokenizer.py  tokenizer.json in (through `tokenizers`) and out (char, trained BPE, GPT-2)
    convert.py       a HF folder -> a minigpt run folder, and back
"""
