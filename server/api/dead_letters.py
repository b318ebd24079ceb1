"""DeadLetterService: translation between protobuf and the dead-letter use cases."""

from __future__ import annotations

from typing import Any

import grpc

from marketplace.events.v1 import dead_letter_service_pb2 as pb
from marketplace.events.v1 import dead_letter_service_pb2_grpc as pb_grpc
from server.api import convert
from server.api.context import current_principal
from server.domain.pagination import page_size
from server.events.dead_letters import DeadLetter, DeadLetters, parse_dead_letter_id

Context = grpc.aio.ServicerContext[Any, Any]


class DeadLetterServicer(pb_grpc.DeadLetterServiceServicer):
    def __init__(self, dead_letters: DeadLetters) -> None:
        self._dead_letters = dead_letters

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        letters, next_token = await self._dead_letters.list_dead_letters(
            page_size(request.page_size), request.page_token, request.consumer
        )
        return pb.ListDeadLettersResponse(
            dead_letters=[dead_letter(letter) for letter in letters], next_page_token=next_token
        )

    async def ReplayDeadLetter(
        self, request: pb.ReplayDeadLetterRequest, context: Context
    ) -> pb.ReplayDeadLetterResponse:
        letter = await self._dead_letters.replay_dead_letter(
            current_principal(), parse_dead_letter_id(request.id), request.request_id
        )
        return pb.ReplayDeadLetterResponse(dead_letter=dead_letter(letter))


def dead_letter(letter: DeadLetter) -> pb.DeadLetter:
    return pb.DeadLetter(
        id=str(letter.id),
        consumer=letter.consumer,
        error=letter.error,
        attempts=letter.attempts,
        original_stream=letter.original_stream,
        original_subject=letter.original_subject,
        original_sequence=letter.original_sequence,
        message_id=letter.message_id,
        event_type=letter.event_type,
        create_time=convert.timestamp(letter.create_time),
        headers=dict(letter.headers),
        data=letter.data,
    )
