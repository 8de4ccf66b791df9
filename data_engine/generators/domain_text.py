"""Synthetic paragraphs for the 18 domains, with their true domain as label.

Real offline text is mostly about software and law, so domain tagging and the
per-domain difficulty cuts would have nothing to work on in the other 16
domains. These paragraphs fill that gap: a small vocabulary per domain
(topics, people, verbs, objects, places, tools) poured into several paragraph
styles (exposition, definition, Q&A, how-to, news). The vocabulary carries
the domain signal; the templates are shared, so a tagger cannot key on them.
"""
from __future__ import annotations

import random

from data_engine.schema import DOMAINS

# field | topics | agents (plural) | verbs (base form) | objects | adjectives | places | tools
_VOCAB_TEXT = {
    "math": """mathematics
prime factorization; linear algebra; probability; calculus; graph theory; number theory; geometric proof; differential equations
mathematicians; statisticians; geometers; algebraists; number theorists
prove; derive; estimate; simplify; bound; approximate
integrals; eigenvalues; polynomial roots; prime numbers; matrices; convergent series; congruences; vector spaces
rigorous; elegant; abstract; formal; symmetric
in the seminar room; at the blackboard; in a proof workshop; in the lecture hall
induction; a computer algebra system; the pigeonhole principle; coordinate geometry""",
    "code": """software engineering
memory management; concurrency; type systems; version control; unit testing; compiler design; API design; database indexing
programmers; software engineers; maintainers; code reviewers; developers
refactor; debug; compile; profile; deploy; benchmark
source files; function calls; merge requests; stack traces; hash tables; build scripts; pull requests; microservices
modular; efficient; thread-safe; readable; scalable
in the repository; on the build server; in the code review; in production
a debugger; a profiler; static analysis; continuous integration""",
    "physics": """physics
quantum mechanics; thermodynamics; electromagnetism; special relativity; fluid dynamics; optics; particle physics; classical mechanics
physicists; experimentalists; theorists; astronomers; cosmologists
measure; calibrate; observe; model; accelerate; detect
photons; magnetic fields; wave functions; particle collisions; entropy changes; orbital velocities; interference patterns; electric charges
relativistic; quantized; conserved; thermal; kinetic
in the particle accelerator; at the observatory; in the vacuum chamber; in the optics lab
a spectrometer; an interferometer; a cloud chamber; laser cooling""",
    "chemistry": """chemistry
organic synthesis; chemical bonding; reaction kinetics; electrochemistry; acid-base equilibrium; polymer chemistry; stoichiometry; catalysis
chemists; lab technicians; biochemists; crystallographers; analytical chemists
titrate; synthesize; distill; oxidize; precipitate; purify
molecules; covalent bonds; reagents; solvents; ionic compounds; reaction yields; isotopes; catalysts
exothermic; volatile; aqueous; stable; reactive
in the fume hood; at the lab bench; in the chemistry lab; in a pilot plant
a burette; chromatography; mass spectrometry; a Bunsen burner""",
    "biology": """biology
natural selection; cell division; gene expression; ecology; photosynthesis; evolutionary biology; microbiology; animal behaviour
biologists; ecologists; geneticists; field researchers; zoologists
sequence; culture; observe; classify; dissect; track
chromosomes; proteins; bacterial colonies; cell membranes; enzymes; food webs; DNA samples; species populations
cellular; genetic; symbiotic; adaptive; microscopic
in the field station; under the microscope; in the wetland; in the greenhouse
PCR; a microscope; gene sequencing; camera traps""",
    "medicine": """medicine
cardiology; infection control; vaccination; chronic disease; diagnosis; clinical trials; pain management; public health
physicians; nurses; surgeons; clinicians; pharmacists
diagnose; prescribe; treat; monitor; examine; vaccinate
patients; blood pressure; symptoms; antibiotics; dosages; medical records; infections; chronic conditions
clinical; acute; chronic; therapeutic; preventive
in the emergency room; at the clinic; in the intensive care unit; in the hospital ward
a stethoscope; blood tests; MRI scans; randomized controlled trials""",
    "law": """law
contract law; criminal procedure; constitutional rights; property law; tort liability; intellectual property; due process; international law
judges; lawyers; prosecutors; legal scholars; juries
interpret; draft; litigate; appeal; enforce; cite
statutes; contracts; court rulings; legal precedents; claims for damages; testimony; regulations; warrants
binding; statutory; constitutional; liable; admissible
in the courtroom; at the appellate court; in the law library; before the tribunal
case law; written briefs; cross-examination; legal databases""",
    "finance": """finance and economics
interest rates; inflation; portfolio theory; monetary policy; market liquidity; corporate bonds; supply and demand; risk management
economists; investors; central bankers; analysts; traders
hedge; forecast; diversify; invest in; price; borrow
stocks; bonds; exchange rates; dividends; loans; GDP figures; interest payments; asset prices
fiscal; volatile; liquid; inflationary; speculative
on the stock exchange; at the central bank; in the bond market; on the trading floor
discounted cash flow; regression models; balance sheets; yield curves""",
    "business": """business
marketing strategy; supply chains; customer retention; startup funding; project management; brand building; human resources; sales forecasting
managers; entrepreneurs; executives; consultants; sales teams
negotiate; launch; outsource; recruit; market; budget for
products; quarterly targets; customer accounts; supplier contracts; business plans; marketing campaigns; new hires; retail stores
competitive; profitable; customer-focused; lean; strategic
in the boardroom; at the trade fair; in the head office; at the shareholder meeting
market research; a CRM system; spreadsheets; key performance indicators""",
    "history": """history
the Roman Empire; the Industrial Revolution; medieval trade; colonial expansion; the Cold War; ancient Egypt; the Renaissance; the French Revolution
historians; archaeologists; archivists; chroniclers; scholars
excavate; date; document; reconstruct; translate; reinterpret
manuscripts; ancient ruins; treaties; dynasties; battle records; artifacts; royal decrees; trade routes
medieval; ancient; imperial; colonial; revolutionary
in the archives; at the excavation site; in the national museum; among the ruins
carbon dating; primary sources; oral histories; old maps""",
    "philosophy": """philosophy
ethics; epistemology; metaphysics; free will; the philosophy of mind; logic; political philosophy; existentialism
philosophers; ethicists; logicians; moral theorists; skeptics
question; justify; refute; reason about; define; defend
moral duties; arguments; theories of truth; premises; claims to knowledge; virtues; paradoxes; thought experiments
moral; metaphysical; rational; normative; dialectical
in the ancient academy; in Socratic dialogue; in the philosophy seminar; in the Enlightenment salons
formal logic; conceptual analysis; the Socratic method; counterexamples""",
    "literature": """literature
the novel; poetry; narrative voice; tragedy; literary criticism; romanticism; the short story; symbolism
novelists; poets; literary critics; readers; playwrights
narrate; interpret; revise; publish; translate; recite
sonnets; characters; plot twists; metaphors; chapters; stanzas; first editions; dialogues
lyrical; tragic; allegorical; satirical; poetic
in the reading room; at the book festival; in the publishing house; in Victorian novels
close reading; free verse; unreliable narrators; foreshadowing""",
    "arts": """the arts
oil painting; film editing; jazz improvisation; sculpture; classical music; photography; stage design; abstract expressionism
painters; composers; film directors; sculptors; musicians
compose; sketch; rehearse; paint; film; exhibit
canvases; melodies; film scenes; brushstrokes; symphonies; portraits; chord progressions; gallery installations
expressive; harmonic; cinematic; abstract; vivid
in the studio; at the gallery; in the concert hall; on the film set
watercolour; a grand piano; a movie camera; colour theory""",
    "education": """education
curriculum design; early literacy; classroom management; assessment; special education; distance learning; teacher training; student motivation
teachers; students; principals; tutors; education researchers
teach; grade; assess; tutor; mentor; plan
lesson plans; homework assignments; report cards; reading groups; exam results; pupils; learning outcomes; classroom activities
pedagogical; formative; inclusive; age-appropriate; academic
in the classroom; at the primary school; in the university lecture hall; during parent-teacher meetings
rubrics; flash cards; quizzes; learning platforms""",
    "politics": """politics and society
elections; democracy; public policy; civil rights; immigration; social inequality; local government; diplomacy
voters; legislators; diplomats; activists; sociologists
vote on; campaign for; legislate on; lobby for; protest; negotiate
ballots; policy reforms; parliamentary bills; coalitions; census data; welfare programs; treaties; public opinion
democratic; partisan; civic; bipartisan; social
in parliament; at the polling station; in city hall; at the United Nations
opinion polls; referendums; town hall meetings; census surveys""",
    "geography": """geography and earth science
climate change; plate tectonics; river systems; urbanization; soil erosion; glaciers; biodiversity loss; weather patterns
geographers; geologists; climatologists; cartographers; environmental scientists
map; survey; sample; monitor; measure; chart
rainfall; coastlines; sediment layers; volcanoes; watersheds; temperature records; mountain ranges; forest cover
tectonic; coastal; arid; glacial; tropical
in the river delta; on the continental shelf; in the rainforest; across the tundra
satellite imagery; GIS software; seismographs; ice cores""",
    "engineering": """engineering
structural engineering; electrical circuits; mechanical design; control systems; materials science; civil infrastructure; aerospace engineering; manufacturing
engineers; technicians; architects; inspectors; machinists
design; weld; assemble; load-test; machine; wire
bridges; steel beams; turbines; circuit boards; gearboxes; concrete foundations; power grids; prototypes
load-bearing; mechanical; electrical; tolerance-critical; reinforced
on the construction site; in the machine shop; at the power plant; in the wind tunnel
CAD software; finite element analysis; a multimeter; strain gauges""",
    "lifestyle": """everyday life
home cooking; travel planning; marathon training; gardening; interior decorating; football; baking bread; budget travel
home cooks; travellers; runners; gardeners; sports fans
cook; bake; pack; plant; prepare; decorate
recipes; suitcases; vegetables; running shoes; sourdough loaves; hotel bookings; living rooms; match tickets
cozy; seasonal; homemade; relaxing; healthy
in the kitchen; at the campsite; in the back garden; at the local stadium
a cast-iron pan; a packing list; a training plan; a compost heap""",
}
_KEYS = ("field", "topics", "agents", "verbs", "objects", "adjs", "places", "tools")
VOCAB = {d: dict(zip(_KEYS, [ln.split("; ") for ln in text.split("\n")])) for d, text in _VOCAB_TEXT.items()}
for _vocab in VOCAB.values():
    _vocab["field"] = _vocab["field"][0]
assert tuple(VOCAB) == DOMAINS  # the vocabulary must cover exactly the shared domain list

_SENTENCES = (
    "{agents} {verb} {object} to learn more about {topic}.",
    "{place}, {agents} {verb} {object} with {tool}.",
    "{a_adj} view of {topic} starts with {object}.",
    "Most introductions to {topic} explain how it connects to {topic2}.",
    "The link between {topic} and {object} is often {adj}.",
    "When {agents} {verb} {object}, they usually rely on {tool}.",
    "Questions about {topic} are rarely settled by {object} alone.",
    "Good practice in {topic} means that {agents} {verb} {object} carefully.",
    "Over the last decades, work on {topic} has changed how {agents} think about {topic2}.",
    "Without {tool}, it is hard to {verb} {object} with any confidence.",
    "Students of {topic} are taught to {verb} {object} before drawing conclusions.",
    "For many {agents}, {topic} and {topic2} are two sides of the same problem.",
    "Some {agents} argue that the study of {topic2} matters more than the study of {topic}.",
    "The {adj} nature of {object} makes {topic} a demanding subject.",
    "Records kept {place} show how {agents} {verb} {object}.",
    "In practice, {agents} {verb} {object} and compare the results with earlier work on {topic2}.",
    "Few {agents} would {verb} {object} {place} without first checking {tool}.",
    "Debates about {topic} tend to return to {object} and {object2}.",
)
STYLES = ("exposition", "definition", "qa", "howto", "news")


def _slots(vocab: dict, rng: random.Random) -> dict:
    topic, topic2 = rng.sample(vocab["topics"], 2)
    obj, obj2 = rng.sample(vocab["objects"], 2)
    adj = rng.choice(vocab["adjs"])
    return {"topic": topic, "topic2": topic2, "object": obj, "object2": obj2,
            "agents": rng.choice(vocab["agents"]), "verb": rng.choice(vocab["verbs"]),
            "adj": adj, "a_adj": f"{'an' if adj[0] in 'aeiou' else 'a'} {adj}", "place": rng.choice(vocab["places"]),
            "tool": rng.choice(vocab["tools"]), "field": vocab["field"]}


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _sentences(vocab: dict, rng: random.Random, n: int) -> list[str]:
    """n different templates, each filled with fresh words from the domain."""
    return [_cap(t.format(**_slots(vocab, rng))) for t in rng.sample(_SENTENCES, n)]


def domain_paragraph(domain: str, rng: random.Random) -> tuple[str, str]:
    """(text, style) of one synthetic paragraph about ``domain``."""
    if domain not in VOCAB:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    vocab, style = VOCAB[domain], rng.choice(STYLES)
    s = _slots(vocab, rng)
    body = _sentences(vocab, rng, rng.randint(3, 6))
    if style == "definition":
        head = [f"The study of {s['topic']} is a central part of {s['field']}.",
                f"It asks how {s['agents']} {s['verb']} {s['object']} and why that matters."]
        return " ".join(head + body), style
    if style == "qa":
        return f"Q: How do {s['agents']} approach {s['topic']}?\nA: " + " ".join(body), style
    if style == "howto":
        steps = [f"1. Start with {s['tool']}.",
                 f"2. {_cap(s['verb'])} the {s['object']} {s['place']}.",
                 f"3. Compare what you find with the basics of {s['topic2']}.",
                 f"4. Write down anything {s['adj']} for the next round."]
        title = f"How {s['agents']} {s['verb']} {s['object']}:"
        return "\n".join([title, *steps, " ".join(body[:3])]), style
    if style == "news":
        lead = (f"{_cap(s['place'])}, {s['agents']} reported new work on {s['topic']} this week. "
                f"The team said the {s['adj']} results on {s['object']} surprised them.")
        return " ".join([lead, *body]), style
    return " ".join(body), style


def synthetic_documents(n: int, rng: random.Random) -> list[dict]:
    """``n`` paragraphs, the domains taking turns; no two texts are equal."""
    out, seen = [], set()
    for i in range(n):
        domain = DOMAINS[i % len(DOMAINS)]
        text, style = domain_paragraph(domain, rng)
        while text in seen:
            text, style = domain_paragraph(domain, rng)
        seen.add(text)
        out.append({"text": text, "source": f"synthetic-{domain}",
                    "meta": {"domain": domain, "style": style}})
    return out
