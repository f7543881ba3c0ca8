"""Alerts: Prefect automations that notify someone when the loop needs a person.

`fitflow setup --notify-url URL` saves a webhook notification block (`fitflow-alerts`, Prefect's
CustomWebhookNotificationBlock: a JSON POST of {"text": subject + body}) and creates, or updates
in place, one automation per alert; `--notify-block TYPE/NAME` uses a block you made yourself
(a Slack webhook, an e-mail server: `slack-webhook/team`, `email-server-credentials/...`), the
same way. Running setup again changes nothing but what changed.

| automation | fires on | message names |
|---|---|---|
| fitflow: flow run failed | a `train`, `sweep` or `predict` flow run Failed or Crashed | the flow run, its MLflow run (tag `mlflow_run_id:`), the reason |
| fitflow: champion changed | `fitflow.model.promoted` | the model and version, its MLflow run, the gate's reason |
| fitflow: drift detected | `fitflow.drift.detected` | the model, the drifted columns, the prediction's MLflow run |
"""

from __future__ import annotations

import logging

from tasks.errors import ConfigError

log = logging.getLogger("fitflow")

WEBHOOK_BLOCK = "fitflow-alerts"
WATCHED_FLOWS = ["train", "sweep", "predict"]

# Jinja, rendered by Prefect for each notification. A flow run's MLflow run is its `mlflow_run_id:` tag.
_MLFLOW_RUN_OF_FLOW_RUN = ("{% for tag in flow_run.tags %}{% if tag.startswith('mlflow_run_id:') %}"
                           "{{ tag[14:] }}{% endif %}{% endfor %}")
FAILED_BODY = ("Flow run '{{ flow_run.name }}' of flow '{{ flow.name }}' ended {{ flow_run.state.name }}. "
               "MLflow run: " + _MLFLOW_RUN_OF_FLOW_RUN + ". Reason: {{ flow_run.state.message }}")
PROMOTED_BODY = ("Model '{{ event.payload.model }}' version {{ event.payload.version }} is the new champion "
                 "(MLflow run {{ event.payload.mlflow_run_id }}): {{ event.payload.reason }}")
DRIFT_BODY = ("Inputs of {{ event.payload.model_uri }} drifted in {{ event.payload.data }}: "
              "{{ event.payload.drifted | list | join(', ') }} (PSI above {{ event.payload.threshold }}; max "
              "{{ event.payload.max_psi }}). Prediction MLflow run {{ event.payload.mlflow_run_id }}.")


def notification_block_id(client, notify_url: str | None, notify_block: str | None):
    """The notification block's document id: a webhook block saved from `notify_url`, or the block
    named `notify_block` (TYPE/NAME, as `prefect block ls` lists it)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.exceptions import ObjectNotFound

    if notify_url:
        if not notify_url.startswith(("http://", "https://")):
            raise ConfigError(f"--notify-url {notify_url!r}: give the webhook's http(s) URL")
        block = CustomWebhookNotificationBlock(name="fitflow", url=notify_url, method="POST",
                                               json_data={"text": "{{subject}}: {{body}}"})
        return block.save(WEBHOOK_BLOCK, overwrite=True)
    kind, _, name = notify_block.partition("/")
    if not kind or not name:
        raise ConfigError(f"--notify-block {notify_block!r}: name the block as TYPE/NAME, e.g. slack-webhook/team-alerts")
    try:
        return client.read_block_document_by_name(name=name, block_type_slug=kind).id
    except ObjectNotFound:
        raise ConfigError(f"--notify-block {notify_block}: no such block on the Prefect server; create it in the UI "
                          "(Blocks) or with Python, then run setup again") from None


def automations(block_id) -> list:
    """The alert automations, each sending its message through the block."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    def alert(name: str, description: str, trigger: EventTrigger, subject: str, body: str) -> AutomationCore:
        return AutomationCore(name=name, description=description, trigger=trigger,
                              actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)])

    return [
        alert("fitflow: flow run failed", "A train, sweep or predict flow run failed or crashed.",
              EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                           match={"prefect.resource.id": "prefect.flow-run.*"},
                           match_related={"prefect.resource.role": "flow", "prefect.resource.name": WATCHED_FLOWS},
                           posture=Posture.Reactive, threshold=1),
              "fitflow: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}", FAILED_BODY),
        alert("fitflow: champion changed", "A registered model has a new champion version.",
              EventTrigger(expect={"fitflow.model.promoted"}, match={"prefect.resource.id": "fitflow.model.*"},
                           posture=Posture.Reactive, threshold=1),
              "fitflow: new champion {{ event.payload.model }} v{{ event.payload.version }}", PROMOTED_BODY),
        alert("fitflow: drift detected", "A model's inputs drifted from its training data.",
              EventTrigger(expect={"fitflow.drift.detected"}, match={"prefect.resource.id": "fitflow.*"},
                           posture=Posture.Reactive, threshold=1),
              "fitflow: drift in the inputs of {{ event.payload.model_name or event.payload.model_uri }}", DRIFT_BODY),
    ]


def create_alerts(client, notify_url: str | None, notify_block: str | None) -> list[str]:
    """Create the alert automations, or update those of the same name in place; returns their names."""
    wanted = automations(notification_block_id(client, notify_url, notify_block))
    for automation in wanted:
        existing = client.read_automations_by_name(automation.name)
        if existing:
            client.update_automation(existing[0].id, automation)
            for duplicate in existing[1:]:  # an earlier race of two setups: keep one
                client.delete_automation(duplicate.id)
        else:
            client.create_automation(automation)
    log.info("alerts: %s", "; ".join(a.name for a in wanted))
    return [a.name for a in wanted]
