"""Paper section 3.2: the Appendix A prompt with in-context examples (section 3.3), the LLM backends that
write conversations, the parser that turns their text into the schema, and what a run costs.
"""
