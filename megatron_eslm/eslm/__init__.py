"""ESLM token selection: scores, the value-at-risk threshold, and selection policies."""
