"""The gold reward that defines the tiny_data task: how positive a short product review is.

Like the classifier that scored generated movie reviews in the DPO paper's controlled-sentiment
experiment, but a word list, so that it is exact, instant and readable:

    score = Σ over the adjectives of the review: +1 if positive, −1 if negative, 0 if neutral,
            doubled when the word before it is "very".

"the battery is very sturdy but the price is poor ." scores 2 − 1 = 1. Only this file defines the task:
build.py draws reviews from the word lists below and labels pairs with score().
"""

POSITIVE = ("great", "excellent", "sturdy", "lovely", "perfect", "reliable", "solid", "superb")
NEGATIVE = ("awful", "poor", "flimsy", "broken", "terrible", "cheap", "noisy", "useless")
NEUTRAL = ("okay", "fine", "average", "normal", "plain", "standard")
INTENSIFIER = "very"


def score(prompt, completion):
    """Gold reward of one completion (a string); the prompt does not matter for this task."""
    words = completion.lower().replace(".", " ").replace(",", " ").split()
    total = 0
    for i, word in enumerate(words):
        sentiment = (word in POSITIVE) - (word in NEGATIVE)
        total += sentiment * (2 if i > 0 and words[i - 1] == INTENSIFIER else 1)
    return float(total)
