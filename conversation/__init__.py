"""What the processors and the workers share about a conversation.

Its history in Redis (turns with their token counts, request claims), the
response cache, and the tokenizer that counts tokens, with the model files it
comes from. Both stages import it; it imports only schemas/ and streams/.
"""
