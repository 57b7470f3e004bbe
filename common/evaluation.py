"""When sites score the global model: an evaluation message, or the start of the next round.

A deployed message costs a round trip through Flower's SuperNode and a ClientApp process, so a
round sends one message where it can. The global model a round ends with is scored by the
sites at the start of the next round's training message (the model that arrives there is that
model), and a separate evaluation message is sent only after every `--evaluate-every`-th round
and after the last one (server.federation's RecordingStrategy).
"""

# the training message's config: score the arriving global model first; the value is the round
# that model ended
INCOMING_KEY = "evaluate-incoming"
# the training reply's MetricRecord holding that score (the evaluation reply's metrics)
INCOMING_RECORD = "incoming-evaluation"


def evaluation_message_after(server_round: int, *, every: int, last: int) -> bool:
    """Whether round `server_round` is followed by an evaluation message.

    Always after the last round and with --evaluate-every 1; otherwise after every `every`-th
    round (0: only the last).
    """
    return server_round >= last or every == 1 or (every > 0 and server_round % every == 0)
