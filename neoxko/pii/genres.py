"""Held-out PII test documents in the genres where Korean numbers get written: tables, JSON, logs, forms, chats.

Written from POLICY.md and FORMATS.md (../shared/pii) alone, without reading the replacer's rules or the
sentence-style generator, so that it tests the policy and not one implementation of it. A record is a whole
document (lines joined by "\\n"). Gold spans follow POLICY.md: from the first character of the number (a bracket
of the number, `+`, `0082` or `82` included) to its last digit; labels, particles and brackets around the whole
number stay outside; a zero-width character or soft hyphen between digits stays inside. About 40% of documents
carry only hard negatives. All values are random.

Documents are written in a small template language: `{token}` or `{token:arg}` draws a value (TOKENS), and a line
`+pii||plain` shows its PII form in a positive document (at least one such line) and its plain form otherwise.

    python -m neoxko.pii.genres --seed 1 --documents 3000 --output genres.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

from neoxko.pii.genre_parts import (
    DISGUISES,
    NEGATIVE_SHARE,
    TOKENS,
    Doc,
    Pii,
    account,
    biz_no,
    digits,
    disguiser,
    fill,
    lead,
    mixed,
    moment,
    name,
    render,
)

PII_LINES = (
    "제 번호 {tel:mobile}이에요", "{tel}로 전화 주세요", "가게 번호 {tel:seoul,area,voip} 여기로 예약하면 돼",
    "입금은 {acc} 으로 부탁드려요", "계좌 보내드려요 {acc}", "평생계좌로 보내줘 {acclife}", "주민번호 {rrn} 맞지?",
    "외국인등록번호는 {rrn:foreign}입니다", "해외라서 {intl} 으로 연락 주세요", "팩스 {tel:seoul,area} 로 보내주세요",
    "배달 안심번호 {tel:safe}로 연락 왔어요", "고객센터 {tel:rep} 에 물어봤어요", "수신거부는 {tel:free}",
    "예전 번호 {tel:legacy} 아직 살아있어요", "애 주민번호 {rrn:child} 로 접종 조회돼요", "회비는 {acc}으로!",
    "{tel:premium} 이런 데서 전화 오면 받지 마", "모임통장 {acc} 여기로 모아요",
)
PLAIN_LINES = (
    "인증번호 {d:6} 왔어?", "{neg} 확인 부탁드려요", "{neg}", "{neg}", "끝자리 {d:4} 맞아?", "{price}씩 보내면 돼",
    "{n:12}시에 {n:12}번 출구에서 봐요", "계좌는 이따 문자로 보낼게요", "번호 바뀌면 알려줘", "ㅋㅋㅋ 알겠어",
    "넵 감사합니다!",
)
LOG_PII = (
    "send ok req={d:8} to={telx:mobile} tmpl=ORDER_SHIPPED", "dlr msisdn={msisdn} status=DELIVRD",
    "sms callback={telx:rep} from={telx} bytes={n:90}", "refund queued {kvacc} amount={n:9000}00",
    "kyc verify fail rrn={rrn:x} reason=NAME_MISMATCH", 'profile updated payload={"tel":"{telx}"}',
    "acct verified acct_no={accno:x} bank_cd=088 holder={name}", "fax sent to={tel:seoul,area} pages={n:9}",
    "push fallback sms to={msisdn:+}",
)
LOG_PLAIN = (
    "GET /api/v1/orders/{stamp} 200 {n:900}ms", "payment approved approval_no={d:8} amount={n:900}00 card={mcard}",
    "biz check biz_no={biz:x} result=VALID", "tracking={track} status=IN_TRANSIT", "event ts={stamp} epoch_ms={epoch}",
    "cust_no=0{d:9} grade=VIP", "scan barcode=880{d:10} qty={n:9}", "sms masked to={mphone}", "otp code={d:6} ttl=180",
    "app_ver={n:9}.{n:30}.{n:9} build={lead:5}", "geo lat=37.{d:6} lng=126.{d:6}", "order_id={ymd}-{d:7} state=PAID",
)


# -- tables: csv, tsv, markdown, html, xml, json ---------------------------------------------------------------

def column(template: str) -> Callable[[random.Random], list[tuple]]:
    return lambda rng: [tuple(fill(rng, template))]


# (Korean headers, English headers, maker of one row's cells); "|" splits a column pair, "/" lists header choices
PII_COLUMNS = (
    ("휴대폰/휴대전화/핸드폰/HP", "phone/mobile/cell", column("{tel:mobile,mobile,mobile,legacy,safe}")),
    ("전화번호/자택전화/직장전화/팩스/대표번호", "tel/office_tel/fax", column("{tel:seoul,area,voip,rep,free}")),
    ("주민등록번호/주민번호", "rrn/resident_no/jumin", column("{rrn}")),
    ("외국인등록번호", "alien_reg_no/frn", column("{rrn:foreign}")),
    ("은행|계좌번호", "bank|account_no", lambda rng: [(x,) for x in account(rng)]),
    ("환불계좌/입금계좌", "refund_account", column("{accplain}")),
)
NEGATIVE_COLUMNS = (
    ("가입일/등록일/가입일자", "joined/created_at", column("{date}")),
    ("금액/누적구매액", "amount/total", column("{price}")),
    ("회원번호", "member_no/member_id", column("{lead:9}")), ("고객번호", "customer_no", column("0{d:9}")),
    ("주문번호", "order_no/order_id", column("{ymd}-{d:7}")),
    ("사업자번호/사업자등록번호", "biz_no/brn", column("{biz}")),
    ("운송장번호/송장번호", "tracking_no/invoice_no", column("{track}")), ("우편번호", "zip/postcode", column("{zip}")),
    ("생년월일", "birth/dob", column("{birth}")), ("연락처", "contact", column("{mphone}")),
    ("주민번호_마스킹", "rrn_masked", column("{mrrn}")), ("승인번호", "approval_no", column("{d:8}")),
    ("등급", "grade", column("{pick:VIP,일반,골드,실버}")),
)
NAME_COLUMN = ("이름/성명", "name", column("{name}"))
HEADERLESS_UNSAFE = ("고객번호", "주문번호")  # without a header these read as a landline and an RRN


def table(rng: random.Random, positive: bool, header: bool = True) -> tuple[list[str], list[list[tuple]]]:
    """A member list: (header, rows of cells); a cell is a tuple of str and Pii pieces."""
    negatives = [c for c in NEGATIVE_COLUMNS if header or c[0] not in HEADERLESS_UNSAFE]
    pii = [c for c in PII_COLUMNS if c[0] != "외국인등록번호" or rng.random() < 0.3]  # keep FRNs a minority
    columns = rng.sample(pii, rng.randint(1, 3)) if positive else []
    columns += rng.sample(negatives, rng.randint(1, 3) + (not positive))
    rng.shuffle(columns)
    columns.insert(0 if rng.random() < 0.8 else rng.randint(0, len(columns)), NAME_COLUMN)
    english = rng.random() < 0.35
    head = [rng.choice(choices.split("/")) for c in columns for choices in c[english].split("|")]
    return head, [[cell for c in columns for cell in c[2](rng)] for _ in range(rng.randint(2, 6))]


def put_row(d: Doc, cells: list[tuple], sep: str, start: str = "", end: str = "\n", quote: bool = False) -> None:
    d.emit(start)
    for i, cell in enumerate(cells):
        mark = '"' if quote or (sep == "," and any("," in str(p) for p in cell if isinstance(p, str))) else ""
        d.write([sep if i else "", mark, *cell, mark])
    d.emit(end)


def csv_export(rng: random.Random, positive: bool, sep: str = ",") -> Doc:
    d, header = Doc(), rng.random() < 0.75
    head, rows = table(rng, positive, header)
    quote = sep == "," and rng.random() < 0.4
    d.emit("\ufeff" if sep == "," and rng.random() < 0.2 else "")  # Excel's byte-order mark
    for row in ([[(h,) for h in head]] if header else []) + rows:
        put_row(d, row, sep, quote=quote)
    return d


def markdown_table(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    d.emit(rng.choice(("### 회원 명단\n\n", "**고객 목록**\n", "")))
    put_row(d, [(h,) for h in head], " | ", "| ", " |\n")
    d.emit("|" + "|".join(rng.choice(("---", ":---", ":---:")) for _ in head) + "|\n")
    for row in rows:
        put_row(d, row, " | ", "| ", " |\n")
    return d


def tel_link(rng: random.Random, cell: tuple) -> tuple:
    """Wrap a phone cell in <a href="tel:...">; the href digits are a second tell span."""
    number = cell[0]
    if not (isinstance(number, Pii) and number.label == "tell" and number.text[0] in "0(") or rng.random() < 0.6:
        return cell
    return ('<a href="tel:', Pii(re.sub(r"\D", "", number.text), "tell"), '">', number, "</a>")


def html_table(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    d.emit(f'<table class="{rng.choice(("member-list", "tbl_customer", "grid"))}">\n')
    put_row(d, [(h,) for h in head], "</th><th>", "  <tr><th>", "</th></tr>\n")
    for row in rows:
        put_row(d, [tel_link(rng, cell) for cell in row], "</td><td>", "  <tr><td>", "</td></tr>\n")
    d.emit("</table>\n")
    if positive and rng.random() < 0.4:
        d.line(fill(rng, '<button class="call" data-tel="{telx:rep,seoul,mobile}">전화 상담</button>'))
    return d


def xml_record(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    d.emit(f'<?xml version="1.0" encoding="UTF-8"?>\n<members exported="{moment(rng):%Y-%m-%dT%H:%M:%S}">\n')
    attributes = rng.random() < 0.3
    for row in rows:
        d.emit(f'  <member id="{lead(rng, 7)}"' + ("" if attributes else ">\n"))
        for tag, cell in zip(head, row, strict=True):
            put_row(d, [cell], "", f' {tag}="' if attributes else f"    <{tag}>", '"' if attributes else f"</{tag}>\n")
        d.emit(" />\n" if attributes else "  </member>\n")
    d.emit("</members>")
    return d


def row_object(head: list[str], row: list[tuple]) -> dict:
    """One table row as a JSON object; the bank and number columns become a nested object."""
    obj, pairs = {}, iter(zip(head, row, strict=True))
    for key, cell in pairs:
        if key in ("은행", "bank"):
            number = next(pairs)[1][0]
            obj["계좌" if key == "은행" else "account"] = {key: cell[0], "번호" if key == "은행" else "number": number}
        else:
            obj[key] = cell[0] if len(cell) == 1 else cell
    return obj


def put_json(d: Doc, node: object, indent: int, depth: int = 0) -> None:
    pad, close = ("\n" + " " * indent * (depth + 1), "\n" + " " * indent * depth) if indent else ("", "")
    if isinstance(node, dict | list):
        items = node.items() if isinstance(node, dict) else [(None, v) for v in node]
        d.emit("{" if isinstance(node, dict) else "[")
        for i, (key, value) in enumerate(items):
            d.emit(("," if i else "") + pad + ("" if key is None else json.dumps(key, ensure_ascii=False) + ": "))
            put_json(d, value, indent, depth + 1)
        d.emit(close + ("}" if isinstance(node, dict) else "]"))
    elif isinstance(node, int) or (isinstance(node, Pii) and not node.quoted):
        d.emit(node if isinstance(node, Pii) else str(node))
    else:
        pieces = node if isinstance(node, tuple) else (node,)
        d.write(['"', *(p if isinstance(p, Pii) else json.dumps(p, ensure_ascii=False)[1:-1] for p in pieces), '"'])


def json_record(rng: random.Random, positive: bool) -> Doc:
    d, (head, rows) = Doc(), table(rng, positive)
    objects = [row_object(head, row) for row in rows]
    for obj in objects:
        obj["order"] = {"order_id": f"{moment(rng):%Y%m%d%H%M%S}{digits(rng, 3)}", "amount": rng.randint(1, 900) * 100,
                        "biz_no": biz_no(rng, rng.choice(("", "-"))), "created_at": f"{moment(rng):%Y%m%d%H%M%S}"}
        if positive and rng.random() < 0.3:
            obj["msisdn"] = TOKENS["msisdn"](rng, rng.choice(("", "+")))
    shape = rng.randrange(3)
    body = objects[0] if shape == 0 else objects if shape == 1 else {"status": "ok", "data": {"members": objects}}
    put_json(d, body, rng.choice((0, 2, 4)))
    return d


# -- logs, chats, scans ----------------------------------------------------------------------------------------

def app_log(rng: random.Random, positive: bool) -> Doc:
    d, when, style = Doc(), moment(rng), rng.randrange(3)
    service = rng.choice(("sms-gateway", "payment-api", "kyc-worker", "order-svc", "notify"))
    for template in mixed(rng, positive, LOG_PII, LOG_PLAIN, rng.randint(2, 6)):
        when += datetime.timedelta(milliseconds=rng.randint(1, 90000))
        stamp = (f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}", f"{when:%Y-%m-%dT%H:%M:%S}+09:00",
                 f"[{when:%Y/%m/%d %H:%M:%S}]")[style]
        d.line([f"{stamp} {rng.choice(('INFO ', 'INFO ', 'DEBUG', 'WARN '))} [{service}] ", *fill(rng, template)])
    return d


def messenger_chat(rng: random.Random, positive: bool) -> Doc:
    """A KakaoTalk export, PC style `[name] [오후 3:12] text` or mobile style `2024. 3. 5. 오후 3:12, name : text`."""
    d, when, people = Doc(), moment(rng), [name(rng) for _ in range(rng.randint(2, 4))]
    pc = rng.random() < 0.6
    d.emit(f"--------------- {when.year}년 {when.month}월 {when.day}일 {'월화수목금토일'[when.weekday()]}요일 "
           "---------------\n" if pc else f"{people[0]} 님과 카카오톡 대화\n저장한 날짜 : {when:%Y-%m-%d %H:%M:%S}\n\n")
    for template in mixed(rng, positive, PII_LINES, PLAIN_LINES, rng.randint(2, 7)):
        when += datetime.timedelta(minutes=rng.randint(0, 9))
        clock = f"{'오전' if when.hour < 12 else '오후'} {(when.hour - 1) % 12 + 1}:{when.minute:02d}"
        who = rng.choice(people)
        d.line([f"[{who}] [{clock}] " if pc else f"{when.year}. {when.month}. {when.day}. {clock}, {who} : ",
                *fill(rng, template)])
    return d


def unicode_variants(rng: random.Random, positive: bool) -> Doc:
    """Numbers in full-width, Arabic-Indic or mathematical bold digits, or with invisible characters inside."""
    d = Doc(disguise=disguiser(rng, rng.choice(DISGUISES)))
    for template in mixed(rng, positive, PII_LINES + LOG_PII, PLAIN_LINES, rng.randint(0, 2)) + ["{neg}"]:
        d.line(fill(rng, template))
    return d


def ocr_noise(rng: random.Random, line: str) -> str:
    """Scanner damage to the template text (never to a value): spaced-out or broken labels, stray marks."""
    def damage(match: re.Match) -> str:
        word, roll = match.group(), rng.random()
        if roll < 0.2:
            return " ".join(word)
        cut = rng.randint(1, len(word) - 1)
        return word[:cut] + "\n" + word[cut:] if roll < 0.28 else word

    parts = re.split(r"(\{[^}]*\})", line)
    text = "".join(part if part.startswith("{") else re.sub(r"[가-힣]{3,}", damage, part) for part in parts)
    return rng.choice(("", "", "", "| ", "ㆍ", "' ")) + text.replace(": ", rng.choice((": ", " : ", ":", " ; ", " . ")))


def ocr_scan(rng: random.Random, positive: bool) -> Doc:
    """Text from a scanned page: `010 - 1234 - 5678`, stray full-width numbers, damaged labels."""
    sep, fullwidth = rng.choice((" - ", "- ", " -", "-", " ")), disguiser(rng, "fullwidth")
    d = Doc(disguise=lambda text: fullwidth(text) if rng.random() < 0.15 else text.replace("-", sep))
    d.line(fill(rng, rng.choice(("[스캔] SCAN_{stamp}.pdf 1/{n:3}", "- {n:5} -", "팩스 수신 {date} {time} P.{n:9}"))))
    return render(d, rng, positive, rng.choice(DOCUMENTS["form"] + SCANS), ocr_noise)


# -- documents in the template language: `+pii||plain` lines, see render() ------------------------------------
DOCUMENTS = {
    "form": ("""
[{pick:회원 가입 신청서,서비스 이용 신청서,환불 신청서,장학금 신청서}]
성명: {name}
+주민등록번호: {rrn}||주민등록번호: {mrrn}
+외국인등록번호: {rrn:foreign}||생년월일: {birth}
+휴대전화: {tel:mobile,legacy}||휴대전화: {mphone}
+자택전화: {tel:seoul,area,voip}
주소: {addr} (우 {zip})
+환불계좌: {acc}||환불계좌: 신청인 명의 통장 사본 첨부
+입금계좌: {acclife}
신청일: {date} / 접수번호: {year}-{d:6}""", """
[진료 접수증] {pick:미소치과,새봄내과의원,튼튼정형외과}
환자명: {name}
+주민등록번호: {rrn}||생년월일: {birth}
+연락처: {tel:mobile}||연락처: {mphone}
+보호자 연락처: {tel:mobile,legacy}
진료과: {pick:내과,정형외과,소아청소년과} / 대기번호 {n:99}
내원일시: {date} {time}""", """
[{year}년 귀속 연말정산 부양가족 명세]
근로자 {name} / 사번 {lead:7} / 사업자등록번호 {biz}
관계 | 성명 | 주민등록번호 | 기본공제
+본인 | {name} | {rrn} | ○||본인 | {name} | {mrrn} | ○
+배우자 | {name} | {rrn} | ○||배우자 | {name} | {mrrn} | ×
+자녀 | {name} | {rrn:child} | ○||자녀 | {name} | {birth} | ○
+부 | {name} | {rrn:old} | ○""", """
부동산 임대차 계약서
소재지: {addr} / 보증금: 금 {price}정
+임대인: {name} 주민등록번호 {rrn} 전화 {tel:mobile}||임대인: 주식회사 {company} 법인등록번호 {corp}
+임차인: {name} 주민등록번호 {rrn}||임차인: {name} 생년월일 {birth}
+입금계좌: {acc}||입금계좌: 계약 당일 고지
중개사무소: {company}공인중개사 사업자등록번호 {biz}
+중개사무소 전화: {tel:seoul,area}
계약일: {date}"""),
    "sms_notice": ("""
[Web발신]
[{pick:CJ대한통운,한진택배,롯데택배,우체국택배}] 고객님의 상품이 {date} 배송 예정입니다.
운송장번호: {track}
+배송기사 {name} {tel:mobile,safe}||배송 문의는 앱에서 해주세요""", """
[Web발신]
[{shop}] 주문 {stamp} 가상계좌 발급
+입금계좌: {acc}||결제수단: 카드 {mcard}
금액: {price} / 입금기한: {date} {time}""", """
[Web발신]
[{pick:KB국민카드,신한카드,현대카드}] {name}님 {date} {time} {price} 일시불 승인 {shop}
누적 {price} / 승인번호 {d:8}
+분실신고 {tel:rep}""", """
[Web발신]
[{shop}] 인증번호 [{d:6}]를 입력해주세요.
+본인 요청이 아니면 {tel:rep,free} 로 신고하세요""", """
(광고)[{shop}] 봄맞이 최대 {n:70}% 할인! {date}까지
+무료수신거부 {tel:free}||수신거부: 앱 설정 > 알림""", """
[Web발신]
[{pick:국민,신한,우리,하나,농협}] {macc} 입금 {price} {name} 잔액 {price}
+문의 {tel:rep}"""),
    "contact_card": ("""
--
{name} {pick:과장,대리,팀장,이사} | {pick:영업1팀,구매팀,경영지원팀}
(주){company}
+T. {tel:seoul,area,rep}||T. 대표 내선 {lead:4}
+M. {tel:mobile,legacy}
+F. {tel:seoul,area}
{addr} ({zip})
{pick:sales,info,contact}@example.co.kr | 사업자등록번호 {biz}""", """
BEGIN:VCARD
VERSION:3.0
FN:{name}
ORG:{company};{pick:영업팀,기술지원팀}
+TEL;TYPE=CELL:{tel:mobile}
+TEL;CELL:{intl}
+TEL;TYPE=WORK,VOICE:{tel:seoul,area,voip}
+TEL;TYPE=FAX:{tel:seoul,area}
EMAIL;TYPE=INTERNET:{pick:kim,lee,park}{d:2}@example.com
ADR;TYPE=WORK:;;{pick:테헤란로,세종대로} {n:400};{pick:서울,부산};;{zip};KR
NOTE:사업자등록번호 {biz}
REV:{stamp}
END:VCARD""", """
{company}
{name}  {pick:대표이사,실장,원장}
+HP {tel:mobile}||HP 010-****-{d:4}
+Tel {tel:seoul,area}  Fax {tel:seoul,area}
+대표번호 {tel:rep}
{addr}"""),
    "receipt": ("""
{shop}
사업자번호 {biz}  대표 {name}
{addr}
+TEL {tel:seoul,area,voip}
[매출전표] {date} {time}  POS:{n:9}  No.{d:4}
--------------------------------
{pick:생수 2L,라면 5입,우유 1L}   {n:9}   {price}
  880{d:10}
합계 {price}
카드번호 {mcard}  승인번호 {d:8}  할부 일시불
+고객센터 {tel:rep}
교환/환불은 {n:14}일 이내 영수증 지참""", """
[배달 주문서] {shop}
주문번호 {ymd}-{d:7}
+안심번호 {tel:safe}||연락처 {mphone} (안심번호 사용)
배달주소 {addr}
결제 {price} (카드 {mcard})
+가게 전화 {tel:seoul,area,voip}"""),
    "family_event": ("""
[부고]
故 {name}님께서 {date} 별세하셨기에 삼가 알려드립니다. (향년 {pick:67,72,78,81,85,88,91}세)
빈소: {pick:서울아산병원,부산대병원,분당서울대병원} 장례식장 {n:20}호실
+빈소 전화: {tel:seoul,area}
발인: {date} {time}
+상주: {name} {tel:mobile}||상주: {name}
마음 전하실 곳
+상주 {name} {acc}||계좌번호는 유족께 문의 바랍니다
+{name} {acc}""", """
{name} ♥ {name} 결혼합니다
일시: {date} {pick:오전 11시,낮 12시 30분,오후 2시}
장소: {pick:더채플,라마다호텔,아펠가모} {n:9}층 그랜드홀
+예식장 문의 {tel:seoul,area,rep}
모바일 청첩장 https://m-card.kr/w/{stamp}{d:4}
마음 전하실 곳
+신랑측 {name} {acc}||축의금은 정중히 사양합니다
+신부측 {name} {acc}
+신랑 연락처 {tel:mobile}"""),
    "public_notice": ("""
{org} 공고 제{year}-{n:999}호
{pick:어르신 교통비 지원 사업 안내,불법 주정차 과태료 부과 사전 통지,공유재산 대부 일반입찰 공고}
「{pick:지방재정법,도로교통법,주차장법}」 제{n:60}조의{n:5}에 따라 다음과 같이 공고합니다.
1. 기간: {date} ~ {date}
2. 참고: {neg}
+3. 문의: {org} {pick:복지정책과,교통행정과,재무과} ☎ {tel:seoul,area}||3. 문의: {org} 민원실 내선 {lead:4}
+   대표번호 {tel:rep} / 팩스 {tel:seoul,area}
+4. 납부계좌: {accplain}(예금주 {org})||4. 납부: 전자납부번호 {d:19}
※ 국번 없이 {short} 또는 {short}
{date}""",),
    "classified_ad": ("""
[{pick:팝니다,판매,급처}] {pick:갤럭시 S23 256GB,아이폰 15 프로,닌텐도 스위치,유모차}
가격: {price} (택포) / {neg}
구매일 {date}, 상태 깨끗합니다
+연락: {tel:mobile,legacy} 문자 주세요||연락은 채팅으로만 주세요
+안심번호 {tel:safe}
+입금: {acc}||선입금 요구는 사기입니다
+카톡 안 되면 {tel:mobile,voip}으로""", """
[구인] {shop} 주말 아르바이트
시급 {pick:10030원,12000원} / 근무 {time}-{time}
+문의 {tel:mobile} {name} 점장||문의는 방문 접수만
위치: {addr}
{neg}""", """
[차량 판매] {pick:아반떼 CN7,쏘렌토 MQ4} {year}년식 {n:99},{d:3}km
차량번호 {n:399}가 {d:4} / 가격 {price}
+연락처 {tel:mobile}||연락처 {mphone}
+계약금 입금 {acc}"""),
    "registry_extract": ("""
등기사항전부증명서(말소사항 포함) - 집합건물
고유번호 {lead:4}-{year}-{d:6}
[집합건물] {addr} 제{n:20}동 제{n:999}호
【 갑 구 】 (소유권에 관한 사항)
순위번호 | 등기목적 | 접수 | 권리자 및 기타사항
1 | 소유권보존 | {date} 제{lead:5}호 | 소유자 주식회사{company} {corp}
+2 | 소유권이전 | {date} 제{lead:5}호 | 소유자 {name} {rrn}||2 | 소유권이전 | {date} 제{lead:5}호 | 소유자 {name} {mrrn}
+3 | 소유권일부이전 | {date} 제{lead:5}호 | 공유자 지분 2분의 1 {name} {rrn}
【 을 구 】 (소유권 이외의 권리에 관한 사항)
1 | 근저당권설정 | {date} 제{lead:5}호 | 채권최고액 금{price} 근저당권자 주식회사{pick:국민은행,신한은행} {corp}
2 | 임의경매개시결정 | {date} 제{lead:5}호 | {pick:서울중앙지방법원,수원지방법원} {year}타경{lead:5}
+신청인 연락처 {tel:mobile}
-- 이하 여백 --
발행번호 {d:4}-{d:4}-{d:4}-{d:4} / 발행일 {date}""",),
}
SCANS = ("""
주 민 등 록 표 ( 등 본 )
발급번호 {d:4}-{d:4}-{d:4}-{d:4}
세대주 성명 {name}  전입 {date}
번호 | 관계 | 성명 | 주민등록번호 | 전입일
+1 | 본인 | {name} | {rrn} | {date}||1 | 본인 | {name} | {mrrn} | {date}
+2 | 배우자 | {name} | {rrn} | {date}||2 | 배우자 | {name} | {mrrn} | {date}
+3 | 자녀 | {name} | {rrn:child} | {date}
위 등본의 원본 내용과 틀림없음을 증명합니다. {date}""", """
{pick:KB국민은행,신한은행,NH농협,우체국} 보통예금 통장
+계좌번호: {accno}||계좌번호: {macc}
예금주: {name}
신규일: {date} / {pick:강남,역삼,해운대}지점
+지점 전화: {tel:seoul,area}""")


def document(kind: str, rng: random.Random, positive: bool) -> Doc:
    return render(Doc(), rng, positive, rng.choice(DOCUMENTS[kind]))


GENRES: dict[str, Callable[[random.Random, bool], Doc]] = {
    "csv_export": csv_export, "tsv_export": partial(csv_export, sep="\t"), "markdown_table": markdown_table,
    "html_table": html_table, "xml_record": xml_record, "json_record": json_record, "app_log": app_log,
    "messenger_chat": messenger_chat, "ocr_scan": ocr_scan, "unicode_variants": unicode_variants,
    **{kind: partial(document, kind) for kind in DOCUMENTS},
}
KINDS: tuple[str, ...] = tuple(GENRES)


def generate(seed: int, documents: int) -> list[dict]:
    """Labelled documents, the genres taken in turn; each document has its own generator, seeded by (seed, index)."""
    records = []
    for i in range(documents):
        kind, rng = KINDS[i % len(KINDS)], random.Random(f"{seed}:{i}")
        positive = rng.random() >= NEGATIVE_SHARE
        records.append(GENRES[kind](rng, positive).record(kind))
        assert bool(records[-1]["spans"]) == positive, (kind, records[-1])
    return records


def write(path: str | Path, records: list[dict]) -> None:
    with Path(path).open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    write(args.output, generate(args.seed, args.documents))


if __name__ == "__main__":
    main()
