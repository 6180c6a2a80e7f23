"""Names stored before they had to be printable (issue 10, item 9) still answer and run: the
stored spec is read with the refused characters replaced, the file name is encoded."""

from __future__ import annotations

import urllib.parse

from sqlalchemy import update

from service.db import Experiment

from .api import execute_all, tiny_spec


def test_an_experiment_stored_with_a_control_character_in_its_name_still_works(client, app):
    created = client.post("/v1/experiments", json=tiny_spec(name="legacy"))
    assert created.status_code == 201
    exp_id = created.json()["id"]
    legacy = "old\r\nname\x85"
    with app.state.sessions.begin() as s:
        spec = s.get(Experiment, exp_id).spec
        s.execute(
            update(Experiment)
            .where(Experiment.id == exp_id)
            .values(name=legacy, spec={**spec, "name": legacy})
        )
    # documents are cached per version (points, status, ...): a name changed under the
    # service, as only this test does, shows once the experiment's version moves on
    assert execute_all(app, exp_id)
    assert client.get(f"/v1/experiments/{exp_id}").json()["name"] == legacy
    doc = client.get(f"/v1/experiments/{exp_id}").json()
    assert doc["status"] == "succeeded", doc
    assert client.get(f"/v1/experiments/{exp_id}/results").status_code == 200
    csv = client.get(f"/v1/experiments/{exp_id}/results.csv")
    assert csv.status_code == 200
    disposition = csv.headers["content-disposition"]
    assert "\r" not in disposition and "\n" not in disposition
    encoded = disposition.split("filename*=UTF-8''")[1]
    assert urllib.parse.unquote(encoded) == f"{legacy}-{exp_id[:8]}.csv"
