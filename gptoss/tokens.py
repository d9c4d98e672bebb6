"""The special token ids of o200k_harmony (spec section 1.3), in one place: the tokenizer (gptoss.harmony),
the config defaults, the checkpoint writer, generation and the demo read them from here. No imports, so
any module can."""

STARTOFTEXT = 199998  # <|startoftext|>, the checkpoints' bos
ENDOFTEXT = 199999  # <|endoftext|>, also the pad id
RETURN = 200002  # <|return|>: the assistant's final message is done
CHANNEL = 200005  # <|channel|>
START = 200006  # <|start|>
END = 200007  # <|end|>: a message ends (not the reply: the analysis ends with it too)
MESSAGE = 200008  # <|message|>
CALL = 200012  # <|call|>: the assistant calls a tool
ASSISTANT_STOP_TOKENS = (RETURN, CALL)  # never <|end|>: it separates the analysis from the final answer
EOS_TOKEN_IDS = (RETURN, ENDOFTEXT, CALL)  # generation_config.json's eos_token_id, as the real checkpoints hold it
