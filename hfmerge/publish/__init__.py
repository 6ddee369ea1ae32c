"""What a merge leaves behind: the result folder, its model card, the Hub commit and the demo Space."""
