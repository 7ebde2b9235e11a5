"""Building blocks shared by the text attacks (gradient matching, token support, sequence search)."""
